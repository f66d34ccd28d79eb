//! The subcommands.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use infl8_core::config::{self, Settings};
use infl8_core::engine::{self, LoadedModel};
use infl8_core::manifest::{self, InferenceMode, Manifest};
pub(crate) use infl8_core::nifti_io::{is_nifti, nifti_stem};

use crate::flags::{ExampleModelArgs, InfoArgs, RuntimeArgs};

pub(crate) fn settings_for(runtime: &RuntimeArgs, layer: &serde_json::Value) -> Result<Settings> {
    Ok(config::load(runtime.config.as_deref(), None, layer)?)
}

/// `s` with control characters (a newline in a file name) escaped, so a
/// name cannot start a line of its own in a log.
pub(crate) fn log_safe(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// [`log_safe`] of a path as displayed.
pub(crate) fn log_path(p: &Path) -> String {
    log_safe(&p.display().to_string()).into_owned()
}

pub fn info(a: InfoArgs) -> Result<ExitCode> {
    let model = infl8_onnx::read_model(&a.model)?;
    let size = std::fs::metadata(&a.model).map(|m| m.len()).unwrap_or(0);
    println!(
        "model:    {} ({:.1} MB)",
        a.model.display(),
        size as f64 / 1e6
    );
    println!(
        "producer: {} {}",
        model.producer_name, model.producer_version
    );
    let opsets: Vec<String> = model
        .opset_import
        .iter()
        .map(|o| {
            let d = if o.domain.is_empty() {
                "ai.onnx"
            } else {
                &o.domain
            };
            format!("{d} {}", o.version)
        })
        .collect();
    println!("opset:    {}", opsets.join(", "));
    if let Some(g) = &model.graph {
        println!(
            "graph:    {} nodes, {} initializers",
            g.node.len(),
            g.initializer.len()
        );
    }
    println!("precision: {}", precision(&model));
    let show = |t: &infl8_onnx::DeclaredTensor| {
        let dims = match &t.shape {
            Some(s) => s
                .iter()
                .map(|d| match d {
                    infl8_onnx::DeclaredDim::Fixed(n) => n.to_string(),
                    infl8_onnx::DeclaredDim::Symbolic(s) => s.clone(),
                    infl8_onnx::DeclaredDim::Unknown => "?".into(),
                })
                .collect::<Vec<_>>()
                .join(", "),
            None => "unknown".into(),
        };
        format!("{} [{}] (elem type {})", t.name, dims, t.elem_type)
    };
    for t in infl8_onnx::inputs(&model) {
        println!("input:    {}", show(&t));
    }
    for t in infl8_onnx::outputs(&model) {
        println!("output:   {}", show(&t));
    }
    let found = manifest::find(&a.model)?;
    match &found {
        Some((m, origin)) => {
            println!("manifest ({origin}):");
            println!("{}", serde_json::to_string_pretty(m)?);
        }
        None => println!(
            "manifest: none (give --roi/--window/... to `infl8 segment`, or add {})",
            manifest::sidecar_path(&a.model).display()
        ),
    }
    let declared = infl8_onnx::inputs(&model);
    let flops = window_shape(found.as_ref().map(|(m, _)| m), declared.first()).and_then(|shape| {
        infl8_flops::model_flops(&a.model, &shape)
            .map(|f| format!("{f} for input {shape:?}"))
            .map_err(|e| e.to_string())
    });
    match flops {
        Ok(line) => println!("FLOPs per window: {line}"),
        Err(why) => println!("FLOPs per window: unknown ({why})"),
    }
    if a.load {
        let settings = settings_for(&a.runtime, &serde_json::Value::Object(a.runtime.layer()))?;
        let LoadedModel {
            backend, model: m, ..
        } = engine::load_model(&settings, &a.model)?;
        println!("loaded on {}:", backend.name());
        println!("  input:  {}", m.input());
        println!("  output: {}", m.output());
    }
    Ok(ExitCode::SUCCESS)
}

/// FP32, or INT8 QDQ with how it was calibrated when infl8 quantized it.
fn precision(model: &infl8_onnx::ModelProto) -> String {
    if let Some(record) = infl8_onnx::metadata(model, infl8_onnx::QUANTIZATION_KEY) {
        let v: serde_json::Value = serde_json::from_str(record).unwrap_or_default();
        let method = match (&v["calibration"]["method"], &v["calibration"]["value"]) {
            (serde_json::Value::String(m), serde_json::Value::Null) => m.clone(),
            (serde_json::Value::String(m), p) => format!("{m} {p}"),
            _ => "unknown calibration".into(),
        };
        return format!(
            "INT8 QDQ (infl8-train quantize: {method} on {} volume(s), from {})",
            v["calibration_volumes"],
            v["source"].as_str().unwrap_or("?")
        );
    }
    let qdq = model
        .graph
        .as_ref()
        .is_some_and(|g| g.node.iter().any(|n| n.op_type == "QuantizeLinear"));
    if qdq {
        "quantized (QuantizeLinear nodes; not from infl8-train quantize)".into()
    } else {
        "float".into()
    }
}

/// The input shape of one window (batch 1) that the manifest, or else the
/// model's fixed input dims, imply; the error says why there is none.
fn window_shape(
    manifest: Option<&Manifest>,
    input: Option<&infl8_onnx::DeclaredTensor>,
) -> Result<Vec<usize>, String> {
    let dims = input.and_then(|t| t.shape.as_deref());
    let fixed = |i: usize| match dims.and_then(|d| d.get(i)) {
        Some(&infl8_onnx::DeclaredDim::Fixed(n)) if n > 0 => usize::try_from(n).ok(),
        _ => None,
    };
    let Some(m) = manifest else {
        let dims = dims.ok_or("the model declares no input shape and has no manifest")?;
        // The batch may stay symbolic: a window is one item.
        return std::iter::once(Some(1))
            .chain((1..dims.len()).map(fixed))
            .collect::<Option<Vec<_>>>()
            .filter(|s| s.len() > 1)
            .ok_or_else(|| {
                "FLOPs need a fixed window: the model has no manifest and its input \
                 dims are not all fixed"
                    .into()
            });
    };
    let c = m.input_channels;
    match &m.inference {
        InferenceMode::SlidingWindow(sw) => Ok([1, c].into_iter().chain(sw.roi).collect()),
        InferenceMode::Slab(s) => {
            let rank = dims.map(<[_]>::len);
            // Where the in-plane axes sit: [N, C, D, X, Y] or [N, C*D, X, Y].
            let (head, plane) = match rank {
                Some(5) => (vec![1, c, s.depth], 3),
                Some(4) => (vec![1, c * s.depth], 2),
                _ => {
                    return Err(
                        "slab models take rank-4 or rank-5 inputs, the model declares neither"
                            .into(),
                    );
                }
            };
            let xy = (0..2)
                .map(|a| match s.roi_xy {
                    Some(r) if r[a] > 0 => Some(r[a]),
                    _ => fixed(plane + a),
                })
                .collect::<Option<Vec<_>>>()
                .ok_or(
                    "FLOPs need a fixed window: the slab's in-plane size follows the \
                     image (set roi_xy in the manifest)",
                )?;
            Ok(head.into_iter().chain(xy).collect())
        }
    }
}

pub fn example_model(a: ExampleModelArgs) -> Result<ExitCode> {
    infl8_core::example::write_model(&a.out, [a.roi[0], a.roi[1], a.roi[2]])?;
    println!("wrote {}", a.out.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use infl8_core::inference::Slab;
    use infl8_onnx::{DeclaredDim, DeclaredTensor};

    fn input(dims: &[Option<i64>]) -> DeclaredTensor {
        DeclaredTensor {
            name: "x".into(),
            elem_type: 1,
            shape: Some(
                dims.iter()
                    .map(|d| d.map_or(DeclaredDim::Symbolic("N".into()), DeclaredDim::Fixed))
                    .collect(),
            ),
        }
    }

    fn slab(depth: usize, roi_xy: Option<[usize; 2]>) -> Manifest {
        Manifest {
            input_channels: 2,
            inference: InferenceMode::Slab(Slab {
                depth,
                roi_xy,
                ..Slab::default()
            }),
            ..infl8_core::example::manifest([8, 8, 8])
        }
    }

    #[test]
    fn sliding_window_uses_the_roi_at_batch_one() {
        let m = infl8_core::example::manifest([64, 48, 32]);
        let i = input(&[None, Some(1), None, None, None]);
        assert_eq!(window_shape(Some(&m), Some(&i)), Ok(vec![1, 1, 64, 48, 32]));
    }

    #[test]
    fn slab_shape_follows_the_input_rank() {
        let flat = input(&[None, Some(6), None, None]);
        let stacked = input(&[None, Some(2), Some(3), Some(40), Some(50)]);
        let m = slab(3, Some([112, 96]));
        assert_eq!(window_shape(Some(&m), Some(&flat)), Ok(vec![1, 6, 112, 96]));
        assert_eq!(
            window_shape(Some(&m), Some(&stacked)),
            Ok(vec![1, 2, 3, 112, 96])
        );
        // No roi_xy (or a 0 in it): the model's fixed in-plane dims.
        let m = slab(3, Some([0, 96]));
        assert_eq!(
            window_shape(Some(&m), Some(&stacked)),
            Ok(vec![1, 2, 3, 40, 96])
        );
        let err = window_shape(Some(&slab(3, None)), Some(&flat)).unwrap_err();
        assert!(err.contains("fixed window"), "{err}");
    }

    #[test]
    fn without_a_manifest_the_fixed_dims_are_the_window() {
        let i = input(&[None, Some(1), Some(16), Some(16), Some(8)]);
        assert_eq!(window_shape(None, Some(&i)), Ok(vec![1, 1, 16, 16, 8]));
        let i = input(&[None, Some(1), None, Some(16), Some(8)]);
        let err = window_shape(None, Some(&i)).unwrap_err();
        assert!(err.contains("fixed window"), "{err}");
    }
}
