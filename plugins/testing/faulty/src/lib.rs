//! A plugin that misbehaves on purpose, one way per backend, so the host's
//! tests can check that each failure stays contained:
//!
//! - `faulty-panic-load` panics in `load`;
//! - `faulty-panic-run` loads, then panics in `run`;
//! - `faulty-error` returns errors: from `load` when the load options carry
//!   `"fail": true`, otherwise from every `run`;
//! - `faulty-bad-output` returns a tensor whose shape disagrees with the
//!   length of its data.
//!
//! Models of all of them take `[N, 4]` and return `[N, 4]`; the model path is
//! not read.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use infl8_core::backend::{
    Backend, BackendError, Dim, ForeignBuffer, LoadOptions, Model, Tensor, TensorInfo,
};

infl8_core::export_plugin! {
    name: "faulty",
    version: env!("CARGO_PKG_VERSION"),
    backends: [
        Box::new(Faulty::PanicLoad),
        Box::new(Faulty::PanicRun),
        Box::new(Faulty::Error),
        Box::new(Faulty::BadOutput),
    ],
}

#[derive(Clone, Copy)]
enum Faulty {
    PanicLoad,
    PanicRun,
    Error,
    BadOutput,
}

impl Backend for Faulty {
    fn name(&self) -> &str {
        match self {
            Faulty::PanicLoad => "faulty-panic-load",
            Faulty::PanicRun => "faulty-panic-run",
            Faulty::Error => "faulty-error",
            Faulty::BadOutput => "faulty-bad-output",
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
            Faulty::PanicLoad => unreachable!("never loads"),
        }
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
