//! INT8 static quantization end to end on a miniature conv + attention
//! model: calibrated on NIfTI volumes through the runtime's own windows,
//! rewritten to QDQ, then run from the real plugins (tract and ort-cpu)
//! and compared with FP32. Also the refusals: an old opset, no
//! calibration data, a node name that does not exist, a corrupt volume.

use std::path::{Path, PathBuf};

use infl8_core::backend::LoadOptions;
use infl8_core::config::ModelOverrides;
use infl8_core::metrics::sqnr_db;
use infl8_core::nifti_io::{DataType, write_volume};
use infl8_core::plugin::PluginHost;
use infl8_core::volume::Volume;
use infl8_onnx::proto::{TypeProto, ValueInfoProto, data_type, type_proto};
use infl8_quantize::{Case, Method, Options, quantize};
use infl8_suite::{ort_library, plugin_lib, s};
use nalgebra::Matrix4;
use ndarray::Array4;

/// Smooth blobs in [0, 1000]: intensities like a windowed scan.
fn volume(phase: f64) -> Volume {
    let data = Array4::from_shape_fn((1, 16, 16, 16), |(_, x, y, z)| {
        let (x, y, z) = (x as f64, y as f64, z as f64);
        (500.0
            + 450.0 * ((x * 0.4 + phase).sin() * (y * 0.3 - phase).cos() + 0.3 * (z * 0.5).sin()))
        .clamp(0.0, 1000.0) as f32
    });
    Volume::new(data, Matrix4::identity())
}

fn calibration_set(dir: &Path) -> Vec<Case> {
    (0..3)
        .map(|i| {
            let image = dir.join(format!("case{i}.nii.gz"));
            write_volume(&image, &volume(i as f64 * 0.7), DataType::F32).unwrap();
            Case {
                id: format!("case{i}"),
                image,
                label: None,
            }
        })
        .collect()
}

fn fp32_model(dir: &Path) -> PathBuf {
    let p = dir.join("fp32.onnx");
    infl8_onnx::write_model(&infl8_onnx::examples::conv_attention_model(), &p).unwrap();
    p
}

/// How `infl8 segment --roi 8 8 8 --window 0 1000` reads a model that
/// carries no manifest.
fn options(method: Method) -> Options {
    Options {
        method,
        exclude: vec![],
        overrides: ModelOverrides {
            roi: Some([8, 8, 8]),
            window: Some([0.0, 1000.0]),
            ..Default::default()
        },
        threads: 2,
        ..Default::default()
    }
}

/// Windows as the runtime feeds them: intensities windowed into [0, 1].
fn windows(n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * 512);
    for i in 0..n {
        let v = volume(0.35 + i as f64);
        out.extend(v.data.iter().take(512).map(|x| x / 1000.0));
    }
    out
}

fn run(host: &PluginHost, backend: &str, model: &Path, data: &[f32], batch: usize) -> Vec<f32> {
    let mut o = LoadOptions {
        threads: 2,
        ..Default::default()
    };
    if backend.starts_with("ort") {
        o.extra.insert("library".into(), s(&ort_library()).into());
    }
    let m = host
        .backend(backend)
        .unwrap()
        .load(model, &o)
        .unwrap_or_else(|e| panic!("{backend} cannot load {}: {e}", model.display()));
    m.run(data, &[batch, 1, 8, 8, 8]).unwrap().into_vec()
}

#[test]
fn qdq_model_runs_on_tract_and_ort_close_to_fp32() {
    let dir = tempfile::tempdir().unwrap();
    let calib = calibration_set(dir.path());
    let fp32 = fp32_model(dir.path());
    let int8 = dir.path().join("int8.onnx");
    let report = quantize(
        &fp32,
        &int8,
        &calib,
        &[],
        &options(Method::Percentile(99.99)),
        &|_, _, _, _, _| {},
    )
    .unwrap();

    // Every weight of the six compute layers is int8 now, per channel.
    let mut ops: Vec<&str> = report.weights.iter().map(|w| w.op_type.as_str()).collect();
    ops.sort();
    assert_eq!(
        ops,
        [
            "Conv",
            "ConvTranspose",
            "MatMul",
            "MatMul",
            "MatMul",
            "MatMul"
        ]
    );
    for w in &report.weights {
        assert!(w.sqnr_db.unwrap() > 30.0, "{w:?}");
    }
    // Activations read by quantized nodes: the image, the normed tokens
    // (shared by Q, K, V), Q, K^T, the attention weights, V, the attention
    // output, the grid before the head.
    assert_eq!(report.activations.len(), 8, "{:#?}", report.activations);
    assert!(report.activations.iter().all(|a| a.threshold > 0.0));
    assert!(report.mean_dice_int8_vs_fp32().unwrap() > 0.9, "{report}");

    let q = infl8_onnx::read_model(&int8).unwrap();
    let g = q.graph.as_ref().unwrap();
    let count = |op: &str| g.node.iter().filter(|n| n.op_type == op).count();
    assert_eq!(count("QuantizeLinear"), 8);
    assert_eq!(count("DequantizeLinear"), 8 + 6);
    assert!(!g.initializer.iter().any(|t| t.name == "attn.q.weight"));
    assert!(g.initializer.iter().any(|t| t.data_type == data_type::INT8));
    // The flags that described the FP32 model travel with the INT8 one.
    assert!(infl8_onnx::metadata(&q, infl8_onnx::MANIFEST_KEY).is_some());
    assert!(infl8_onnx::metadata(&q, infl8_quantize::QUANTIZATION_KEY).is_some());

    let mut host = PluginHost::new(vec![]);
    host.load_library(plugin_lib("infl8_tract")).unwrap();
    host.load_library(plugin_lib("infl8_ort")).unwrap();
    let data = windows(3);
    let mut int8_out = Vec::new();
    for backend in ["tract", "ort-cpu"] {
        let f = run(&host, backend, &fp32, &data, 3);
        let i = run(&host, backend, &int8, &data, 3);
        let snr = sqnr_db(&f, &i).unwrap();
        assert!(snr > 25.0, "{backend}: INT8 vs FP32 SQNR {snr:.1} dB");
        assert!(snr < 80.0, "{backend}: INT8 identical to FP32? {snr:.1} dB");
        int8_out.push(i);
    }
    // Both runtimes compute the same quantized function.
    let snr = sqnr_db(&int8_out[0], &int8_out[1]).unwrap();
    assert!(snr > 35.0, "tract vs ORT on the INT8 model: {snr:.1} dB");
}

#[test]
fn calibration_methods_give_ordered_ranges_on_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let calib = calibration_set(dir.path());
    let fp32 = fp32_model(dir.path());
    let thresholds = |m: Method, name: &str| {
        let r = quantize(
            &fp32,
            &dir.path().join(name),
            &calib,
            &calib[..1],
            &options(m),
            &|_, _, _, _, _| {},
        )
        .unwrap();
        r.activations
            .iter()
            .map(|a| (a.tensor.clone(), a.amax, a.threshold))
            .collect::<Vec<_>>()
    };
    let minmax = thresholds(Method::MinMax, "mm.onnx");
    let pct = thresholds(Method::Percentile(90.0), "pct.onnx");
    for ((name, amax, t_mm), (_, _, t_pct)) in minmax.iter().zip(&pct) {
        if name.starts_with("Softmax") {
            // Probabilities get their known range whatever the method.
            assert_eq!(*t_mm, 1.0);
            continue;
        }
        assert!(
            *amax >= *t_mm,
            "{name}: threshold {t_mm} above the largest |x| {amax}"
        );
        assert!(t_pct <= t_mm && *t_pct > 0.0, "{name}: {t_pct} vs {t_mm}");
    }
    assert!(minmax.iter().zip(&pct).any(|(a, b)| b.2 < 0.9 * a.2));
}

/// The largest |x| that `tensor` takes when the FP32 model at `model` runs
/// on one `[1, 1, 8, 8, 8]` window, measured on the tract plugin with a copy
/// of the model whose output is that tensor: independent of the
/// calibration's in-process observer and its histograms.
fn largest_abs(host: &PluginHost, model: &Path, tensor: &str, window: &[f32]) -> f32 {
    let mut proto = infl8_onnx::read_model(model).unwrap();
    let graph = proto.graph.as_mut().unwrap();
    if graph.input.iter().any(|i| i.name == tensor) {
        return window.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    }
    graph.output = vec![ValueInfoProto {
        name: tensor.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: data_type::FLOAT,
                shape: None,
            })),
            denotation: String::new(),
        }),
        doc_string: String::new(),
    }];
    let probe = model.with_file_name("probe.onnx");
    infl8_onnx::write_model(&proto, &probe).unwrap();
    let out = run(host, "tract", &probe, window, 1);
    out.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

#[test]
fn minmax_threshold_is_the_largest_activation_on_the_calibration_window() {
    let dir = tempfile::tempdir().unwrap();
    let fp32 = fp32_model(dir.path());
    // One volume that is exactly one 8^3 window: the calibration sees this
    // window and nothing else.
    let data = volume(0.35)
        .data
        .slice(ndarray::s![.., 4..12, 2..10, 5..13])
        .to_owned();
    let image = dir.path().join("one.nii.gz");
    write_volume(
        &image,
        &Volume::new(data.clone(), Matrix4::identity()),
        DataType::F32,
    )
    .unwrap();
    let calib = [Case {
        id: "one".into(),
        image,
        label: None,
    }];
    let r = quantize(
        &fp32,
        &dir.path().join("mm.onnx"),
        &calib,
        &calib,
        &options(Method::MinMax),
        &|_, _, _, _, _| {},
    )
    .unwrap();
    // `--window 0 1000`, as the runtime computes it.
    let window: Vec<f32> = data
        .iter()
        .map(|v| (f64::from(*v).clamp(0.0, 1000.0) / 1000.0) as f32)
        .collect();
    let graph = infl8_onnx::read_model(&fp32).unwrap().graph.unwrap();
    let softmax = |t: &str| {
        graph
            .node
            .iter()
            .any(|n| n.op_type == "Softmax" && n.output.iter().any(|o| o == t))
    };
    let mut host = PluginHost::new(vec![]);
    host.load_library(plugin_lib("infl8_tract")).unwrap();
    let mut checked = 0;
    for a in r.activations.iter().filter(|a| !softmax(&a.tensor)) {
        let want = largest_abs(&host, &fp32, &a.tensor, &window);
        assert!(want > 0.0, "{}: all zero", a.tensor);
        assert!(
            (a.threshold - want).abs() <= 1e-5 * want,
            "{}: minmax threshold {} but the largest |x| is {want}",
            a.tensor,
            a.threshold
        );
        checked += 1;
    }
    assert!(checked >= 3, "{:?}", r.activations);
}

#[test]
fn refusals_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let calib = calibration_set(dir.path());
    let fp32 = fp32_model(dir.path());
    let out = dir.path().join("int8.onnx");
    let no_progress = |_: &str, _: usize, _: usize, _: u64, _: u64| {};

    let err = quantize(
        &fp32,
        &out,
        &[],
        &[],
        &options(Method::MinMax),
        &no_progress,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no calibration volumes"), "{err}");

    let mut o = options(Method::MinMax);
    o.exclude = vec!["no_such_node".into()];
    let err = quantize(&fp32, &out, &calib, &[], &o, &no_progress)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no_such_node"), "{err}");

    let mut old = infl8_onnx::examples::conv_attention_model();
    old.opset_import[0].version = 11;
    let old_path = dir.path().join("old.onnx");
    infl8_onnx::write_model(&old, &old_path).unwrap();
    let err = quantize(
        &old_path,
        &out,
        &calib,
        &[],
        &options(Method::MinMax),
        &no_progress,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("opset 11"), "{err}");

    let bad = dir.path().join("corrupt.nii.gz");
    std::fs::write(&bad, b"\x1f\x8b not really gzip").unwrap();
    let cases = vec![Case {
        id: "corrupt".into(),
        image: bad.clone(),
        label: None,
    }];
    let err = quantize(
        &fp32,
        &out,
        &cases,
        &[],
        &options(Method::MinMax),
        &no_progress,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("corrupt.nii.gz"), "{err}");
    assert!(!out.exists(), "a failed run left {}", out.display());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("quantizing"))
        .collect();
    assert!(leftovers.is_empty());
}
