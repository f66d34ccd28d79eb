//! Post-training INT8 static quantization of ONNX segmentation models.
//!
//! The output is QDQ ONNX (QuantizeLinear/DequantizeLinear pairs): what
//! TensorRT's explicit quantization and ONNX Runtime's CPU kernels consume,
//! and what tract runs; tract lacks the com.microsoft QOperator ops, so
//! none are written. Weights of Conv, ConvTranspose, MatMul and Gemm are
//! int8, symmetric, one scale per output channel; activations they read are
//! int8, symmetric, one scale per tensor, calibrated on real volumes
//! through the model's own preprocessing, windows and batching.
//!
//! [`quantize`] runs it all and returns a [`Report`]: each quantized
//! tensor's SQNR (where accuracy goes) and the Dice between the INT8 and
//! the FP32 label maps (what it costs a user).

pub mod calibrate;
pub mod observe;
pub mod plan;
pub mod qdq;
pub mod report;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use infl8_backend::{LoadOptions, Model};
use infl8_core::config::ModelOverrides;
use infl8_core::manifest::{self, Manifest, ManifestOrigin, Postprocessing};
use infl8_core::metrics::{hard_dice, sqnr_db};
use infl8_core::nifti_io::{self, ReadLimits};
use infl8_core::segment::Segmenter;

pub use calibrate::Method;
pub use plan::{DEFAULT_EXCLUDE, DEFAULT_OP_TYPES, Plan};
pub use report::{ActivationReport, EvalReport, Report};

pub use infl8_onnx::QUANTIZATION_KEY;

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error(transparent)]
    Onnx(#[from] infl8_onnx::OnnxError),
    #[error(transparent)]
    Manifest(#[from] infl8_core::manifest::ManifestError),
    #[error("{0}")]
    Model(String),
    #[error("{0}")]
    Options(String),
    #[error(transparent)]
    Backend(#[from] infl8_backend::BackendError),
    #[error(transparent)]
    Segment(#[from] infl8_core::segment::SegmentError),
    #[error(transparent)]
    Nifti(#[from] infl8_core::nifti_io::NiftiIoError),
    #[error("{path}: {message}")]
    Volume { path: PathBuf, message: String },
}

/// A volume to calibrate or evaluate on; a label map, when there is one,
/// adds the Dice of both models against it.
#[derive(Clone, Debug)]
pub struct Case {
    pub id: String,
    pub image: PathBuf,
    pub label: Option<PathBuf>,
}

/// How to quantize.
#[derive(Clone, Debug)]
pub struct Options {
    pub method: Method,
    /// Op types whose inputs are quantized.
    pub op_types: Vec<String>,
    /// `first`, `last`, `op:TYPE` or node names.
    pub exclude: Vec<String>,
    /// How to read a model without a manifest (or override its manifest),
    /// as `infl8 segment` would.
    pub overrides: ModelOverrides,
    /// Windows per model call.
    pub window_batch: usize,
    /// Worker threads of the tract runs (0 = all cores).
    pub threads: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            method: Method::Percentile(99.99),
            op_types: DEFAULT_OP_TYPES.iter().map(|s| s.to_string()).collect(),
            exclude: DEFAULT_EXCLUDE.iter().map(|s| s.to_string()).collect(),
            overrides: ModelOverrides::default(),
            window_batch: 4,
            threads: 0,
        }
    }
}

/// Progress: (stage, volume index, volume count, windows done, windows total).
pub type Progress<'a> = &'a (dyn Fn(&str, usize, usize, u64, u64) + Sync);

/// Quantizes `model` into `out`, calibrating on `calib`, and compares the
/// two models on `eval` (on `calib` when `eval` is empty).
pub fn quantize(
    model_path: &Path,
    out: &Path,
    calib: &[Case],
    eval: &[Case],
    opts: &Options,
    progress: Progress,
) -> Result<Report, QuantizeError> {
    if calib.is_empty() {
        return Err(QuantizeError::Options(
            "no calibration volumes: give --calib with NIfTI files or a folder of them".into(),
        ));
    }
    let proto = infl8_onnx::read_model(model_path)?;
    let plan = Plan::new(&proto, &opts.op_types, &opts.exclude)?;
    if plan.targets.is_empty() {
        return Err(QuantizeError::Options(format!(
            "{}: no node left to quantize (op types {:?}, exclusions {:?})",
            model_path.display(),
            opts.op_types,
            opts.exclude
        )));
    }
    let observed = observe::ObservedModel::new(model_path, &proto, plan.observed.clone())?;
    let stats = observed.stats();
    let (manifest, origin) = manifest::resolve(
        model_path,
        observed.input(),
        observed.output(),
        &opts.overrides,
    )?;
    tracing::info!(
        model = %model_path.display(),
        manifest = %origin,
        nodes = plan.targets.len(),
        activations = plan.observed.len(),
        "calibrating"
    );

    // Calibration: the segmenter drives the observed model exactly as
    // `infl8 segment` drives a backend.
    let t0 = Instant::now();
    let segmenter = Segmenter {
        model: Box::new(observed),
        manifest: manifest.clone(),
        window_batch: opts.window_batch.max(1),
        postprocess: Postprocessing::default(),
    };
    let limits = ReadLimits::default();
    let mut calib_windows = 0;
    for (i, c) in calib.iter().enumerate() {
        let vol = nifti_io::read_volume(&c.image, &limits)?;
        let seg = segmenter.segment(&vol, &c.image, false, &|d, t| {
            progress("calibrate", i, calib.len(), d, t)
        })?;
        calib_windows += seg.windows;
    }
    drop(segmenter);
    let calib_s = t0.elapsed().as_secs_f64();

    let hists = stats
        .lock()
        .map_err(|_| QuantizeError::Model("a calibration worker panicked".into()))?
        .clone();
    let producers: HashMap<&str, &str> = plan::graph(&proto)?
        .node
        .iter()
        .flat_map(|n| {
            n.output
                .iter()
                .map(move |o| (o.as_str(), n.op_type.as_str()))
        })
        .collect();
    let mut thresholds = HashMap::new();
    let mut activations = Vec::new();
    for (name, h) in plan.observed.iter().zip(&hists) {
        if h.non_finite() > 0 {
            return Err(QuantizeError::Model(format!(
                "{}: activation {name} took {} NaN/infinite values on the calibration \
                 volumes; the FP32 model itself is broken there",
                model_path.display(),
                h.non_finite()
            )));
        }
        // A probability's range is known: calibrating it would only clip
        // the few large attention weights that carry the signal.
        let t = if producers.get(name.as_str()) == Some(&"Softmax") {
            1.0
        } else {
            h.threshold(opts.method)
        };
        thresholds.insert(name.clone(), t);
        let readers = plan
            .targets
            .iter()
            .filter(|n| n.activations.iter().any(|(_, a)| a == name))
            .map(|n| n.node.clone())
            .collect();
        activations.push(ActivationReport {
            tensor: name.clone(),
            nodes: readers,
            amax: h.amax(),
            threshold: t,
            values: h.count(),
            sqnr_db: h.sqnr_db(t),
        });
    }

    let (mut qmodel, weights) = qdq::rewrite(&proto, &plan, &thresholds)?;
    if origin == ManifestOrigin::Settings {
        // Flags described the FP32 model; the INT8 one carries them so it
        // runs without them.
        infl8_onnx::set_metadata(&mut qmodel, infl8_onnx::MANIFEST_KEY, &manifest.to_json());
    }
    let record = serde_json::json!({
        "format": "QDQ",
        "weights": "int8 symmetric, per output channel",
        "activations": "int8 symmetric, per tensor",
        "calibration": opts.method,
        "calibration_volumes": calib.len(),
        "excluded": plan.excluded.iter().map(|e| &e.node).collect::<Vec<_>>(),
        "source": model_path.file_name().map(|n| n.to_string_lossy().into_owned()),
    });
    infl8_onnx::set_metadata(&mut qmodel, QUANTIZATION_KEY, &record.to_string());
    qmodel.producer_name = "infl8-quantize".into();
    // The model lands under its name only once the comparison has run: a
    // failed run leaves no output behind that looks finished.
    let staging = staging_path(out);
    infl8_onnx::write_model(&qmodel, &staging)?;
    let t1 = Instant::now();
    let eval_cases = if eval.is_empty() { calib } else { eval };
    let evals =
        evaluate(model_path, &staging, &manifest, eval_cases, opts, progress).and_then(|e| {
            std::fs::rename(&staging, out).map_err(|source| {
                QuantizeError::Onnx(infl8_onnx::OnnxError::Write {
                    path: out.to_path_buf(),
                    source,
                })
            })?;
            Ok(e)
        });
    let evals = match evals {
        Ok(e) => e,
        Err(e) => {
            let _ = std::fs::remove_file(&staging);
            return Err(e);
        }
    };
    let eval_s = t1.elapsed().as_secs_f64();

    Ok(Report {
        model: model_path.to_path_buf(),
        output: out.to_path_buf(),
        method: opts.method,
        manifest_origin: origin.to_string(),
        calibration_volumes: calib.iter().map(|c| c.id.clone()).collect(),
        calibration_windows: calib_windows,
        evaluated_on_calibration: eval.is_empty(),
        fp32_bytes: std::fs::metadata(model_path).map(|m| m.len()).unwrap_or(0),
        int8_bytes: std::fs::metadata(out).map(|m| m.len()).unwrap_or(0),
        activations,
        weights,
        excluded: plan.excluded,
        eval: evals,
        calibration_s: calib_s,
        evaluation_s: eval_s,
    })
}

/// A hidden name beside `out`, on the same file system so the final
/// rename is atomic.
fn staging_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model.onnx".into());
    out.with_file_name(format!(".{name}.{}.quantizing", std::process::id()))
}

fn read_labels(path: &Path, limits: &ReadLimits) -> Result<Vec<u8>, QuantizeError> {
    let v = nifti_io::read_volume(path, limits)?;
    if v.channels() != 1 {
        return Err(QuantizeError::Volume {
            path: path.to_path_buf(),
            message: format!(
                "a label map has one channel, this file has {}",
                v.channels()
            ),
        });
    }
    v.data
        .iter()
        .map(|&x| {
            let r = x.round();
            if (0.0..=255.0).contains(&r) {
                Ok(r as u8)
            } else {
                Err(QuantizeError::Volume {
                    path: path.to_path_buf(),
                    message: format!("label value {x} is not in 0..=255"),
                })
            }
        })
        .collect()
}

/// Segments each case with both models on the tract backend and compares.
fn evaluate(
    fp32: &Path,
    int8: &Path,
    manifest: &Manifest,
    cases: &[Case],
    opts: &Options,
    progress: Progress,
) -> Result<Vec<EvalReport>, QuantizeError> {
    let load = LoadOptions {
        threads: opts.threads,
        ..Default::default()
    };
    let segmenter =
        |model: Box<dyn Model>| Segmenter::new(model, manifest.clone(), opts.window_batch);
    let f = segmenter(Box::new(infl8_tract::TractModel::load(fp32, &load)?));
    let q = segmenter(Box::new(infl8_tract::TractModel::load(int8, &load)?));
    let limits = ReadLimits::default();
    let classes = manifest.labels.len();
    let mut out = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let vol = nifti_io::read_volume(&c.image, &limits)?;
        let tf = Instant::now();
        let sf = f.segment(&vol, &c.image, true, &|d, t| {
            progress("evaluate fp32", i, cases.len(), d, t)
        })?;
        let fp32_s = tf.elapsed().as_secs_f64();
        let tq = Instant::now();
        let sq = q.segment(&vol, &c.image, true, &|d, t| {
            progress("evaluate int8", i, cases.len(), d, t)
        })?;
        let int8_s = tq.elapsed().as_secs_f64();
        let lf: Vec<u8> = sf.labels.iter().copied().collect();
        let lq: Vec<u8> = sq.labels.iter().copied().collect();
        let per_label = |a: &[u8], b: &[u8]| -> Vec<Option<f64>> {
            (1..classes).map(|k| hard_dice(a, b, k as u8)).collect()
        };
        let logits_sqnr_db = match (&sf.logits, &sq.logits) {
            (Some(a), Some(b)) if a.shape() == b.shape() => {
                let (a, b) = (a.as_standard_layout(), b.as_standard_layout());
                match (a.as_slice(), b.as_slice()) {
                    (Some(x), Some(y)) => sqnr_db(x, y),
                    _ => None,
                }
            }
            _ => None,
        };
        let truth = match &c.label {
            Some(p) => {
                let t = read_labels(p, &limits)?;
                if t.len() != lf.len() {
                    return Err(QuantizeError::Volume {
                        path: p.clone(),
                        message: format!(
                            "{} voxels, its image {} has {}",
                            t.len(),
                            c.image.display(),
                            lf.len()
                        ),
                    });
                }
                Some(t)
            }
            None => None,
        };
        out.push(EvalReport {
            id: c.id.clone(),
            dice_int8_vs_fp32: per_label(&lq, &lf),
            dice_fp32_vs_truth: truth.as_ref().map(|t| per_label(&lf, t)),
            dice_int8_vs_truth: truth.as_ref().map(|t| per_label(&lq, t)),
            logits_sqnr_db,
            fp32_s,
            int8_s,
        });
    }
    Ok(out)
}
