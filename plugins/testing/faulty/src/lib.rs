//! A plugin that misbehaves on purpose, one way per backend, so the host's
//! tests can check that each failure stays contained:
//!
//! - `faulty-panic-load` panics in `load`;
//! - `faulty-panic-run` loads, then panics in `run`;
//! - `faulty-error` returns errors: from `load` when the load options carry
//!   `"fail": true`, otherwise from every `run`;
//! - `faulty-bad-output` returns a tensor whose shape disagrees with the
//!   length of its data;
//! - `faulty-marker` segments, and fails only the inputs that carry a
//!   marker: a window holding a value above the load option `marker_above`
//!   (default 1000) is refused with a run error, any other window gets a
//!   per-voxel threshold model (label 1 where the normalised intensity is
//!   above `threshold`, default 0); a window holding a value below the
//!   option `hang_below` (default: none) never returns. `infl8 watch`'s soak
//!   test uses it to poison chosen volumes of an otherwise working service.
//!
//! Models of the first four take `[N, 4]` and return `[N, 4]`;
//! `faulty-marker` takes `[N, 1, X, Y, Z]` and returns `[N, 2, X, Y, Z]`
//! (any window size: the manifest in the model file sets it). The model
//! path is not read.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use infl8_backend::{
    Backend, BackendError, Dim, ForeignBuffer, LoadOptions, Model, Tensor, TensorInfo,
};

infl8_backend::export_plugin! {
    name: "faulty",
    version: env!("CARGO_PKG_VERSION"),
    backends: [
        Box::new(Faulty::PanicLoad),
        Box::new(Faulty::PanicRun),
        Box::new(Faulty::Error),
        Box::new(Faulty::BadOutput),
        Box::new(Faulty::Marker),
    ],
}

#[derive(Clone, Copy)]
enum Faulty {
    PanicLoad,
    PanicRun,
    Error,
    BadOutput,
    Marker,
}

impl Backend for Faulty {
    fn name(&self) -> &str {
        match self {
            Faulty::PanicLoad => "faulty-panic-load",
            Faulty::PanicRun => "faulty-panic-run",
            Faulty::Error => "faulty-error",
            Faulty::BadOutput => "faulty-bad-output",
            Faulty::Marker => "faulty-marker",
        }
    }

    fn description(&self) -> &str {
        "misbehaves on purpose (host tests only)"
    }

    fn load(&self, model: &Path, opts: &LoadOptions) -> Result<Box<dyn Model>, BackendError> {
        match self {
            Faulty::PanicLoad => panic!("faulty-panic-load: deliberate panic while loading"),
            Faulty::Error if opts.extra.get("fail").and_then(|v| v.as_bool()) == Some(true) => {
                Err(BackendError::Load {
                    path: model.display().to_string(),
                    message: "faulty-error: deliberate load failure".into(),
                })
            }
            Faulty::Marker if !model.is_file() => Err(BackendError::Load {
                path: model.display().to_string(),
                message: "faulty-marker: no such model file".into(),
            }),
            Faulty::Marker => {
                let number = |key: &str, default: f32| -> Result<f32, BackendError> {
                    match opts.extra.get(key) {
                        None => Ok(default),
                        Some(v) => v
                            .as_f64()
                            .map(|f| f as f32)
                            .ok_or_else(|| BackendError::Load {
                                path: model.display().to_string(),
                                message: format!(
                                    "faulty-marker: option {key} = {v} is not a number"
                                ),
                            }),
                    }
                };
                let info = |name: &str, channels: usize| TensorInfo {
                    name: name.into(),
                    shape: vec![
                        Dim::Symbolic("N".into()),
                        Dim::Fixed(channels),
                        Dim::Symbolic("X".into()),
                        Dim::Symbolic("Y".into()),
                        Dim::Symbolic("Z".into()),
                    ],
                };
                Ok(Box::new(MarkerModel {
                    marker_above: number("marker_above", 1000.0)?,
                    hang_below: number("hang_below", f32::NEG_INFINITY)?,
                    threshold: number("threshold", 0.0)?,
                    input: info("image", 1),
                    output: info("logits", 2),
                }))
            }
            _ => {
                let info = |name: &str| TensorInfo {
                    name: name.into(),
                    shape: vec![Dim::Symbolic("N".into()), Dim::Fixed(4)],
                };
                Ok(Box::new(FaultyModel {
                    kind: *self,
                    input: info("x"),
                    output: info("y"),
                }))
            }
        }
    }
}

struct FaultyModel {
    kind: Faulty,
    input: TensorInfo,
    output: TensorInfo,
}

impl Model for FaultyModel {
    fn input(&self) -> &TensorInfo {
        &self.input
    }

    fn output(&self) -> &TensorInfo {
        &self.output
    }

    fn run(&self, data: &[f32], shape: &[usize]) -> Result<Tensor, BackendError> {
        match self.kind {
            Faulty::PanicRun => panic!("faulty-panic-run: deliberate panic while running"),
            Faulty::Error => Err(BackendError::Run(
                "faulty-error: deliberate run failure".into(),
            )),
            Faulty::BadOutput => Tensor::from_foreign(
                shape.to_vec(),
                Box::new(ShrinkingBuffer {
                    data: data.to_vec(),
                    checked: AtomicBool::new(false),
                }),
            ),
            Faulty::PanicLoad | Faulty::Marker => unreachable!("never loads a FaultyModel"),
        }
    }
}

/// `faulty-marker`'s model: a threshold per voxel, or an error for a window
/// holding the marker.
struct MarkerModel {
    marker_above: f32,
    /// A window holding a value below this hangs the call for good (what a
    /// deadlocked vendor library does): only a parent process can stop it.
    hang_below: f32,
    threshold: f32,
    input: TensorInfo,
    output: TensorInfo,
}

impl Model for MarkerModel {
    fn input(&self) -> &TensorInfo {
        &self.input
    }

    fn output(&self) -> &TensorInfo {
        &self.output
    }

    fn run(&self, data: &[f32], shape: &[usize]) -> Result<Tensor, BackendError> {
        self.input.check_run_input(data.len(), shape)?;
        if data.iter().any(|v| *v < self.hang_below) {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        if let Some(v) = data.iter().find(|v| **v > self.marker_above) {
            return Err(BackendError::Run(format!(
                "faulty-marker: the window holds the marker value {v} (above marker_above = {})",
                self.marker_above
            )));
        }
        // One channel in (checked above): each item is one spatial block.
        let spatial: usize = shape.iter().skip(2).product();
        let mut out = Vec::with_capacity(2 * data.len());
        for item in data.chunks(spatial.max(1)) {
            out.extend(std::iter::repeat_n(0.0, item.len()));
            out.extend(item.iter().map(|v| v - self.threshold));
        }
        let mut out_shape = shape.to_vec();
        out_shape[1] = 2;
        Tensor::from_vec(out_shape, out)
    }
}

/// `Tensor` checks its length once, when built; a foreign buffer that
/// answers correctly that once and short afterwards is how a buggy plugin
/// gets a tensor past its own checks. The host must catch it at the ABI.
struct ShrinkingBuffer {
    data: Vec<f32>,
    checked: AtomicBool,
}

impl ForeignBuffer for ShrinkingBuffer {
    fn as_slice(&self) -> &[f32] {
        if self.checked.swap(true, Ordering::Relaxed) {
            &self.data[..self.data.len().saturating_sub(1)]
        } else {
            &self.data
        }
    }
}
