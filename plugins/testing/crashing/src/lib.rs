//! A plugin whose models load and describe themselves correctly but whose
//! runs take the process down, so the conformance kit's crash and hang
//! containment can be tested:
//!
//! - `crash-abort` aborts the process in `run` (what a C plugin's failed
//!   assertion or a Rust `panic = "abort"` build does; no unwinding to catch);
//! - `crash-hang` never returns from `run`.
//!
//! Models take `[N, 1, X, Y, Z]` and return `[N, 2, X, Y, Z]`; the model
//! path is not read.

use std::path::Path;

use infl8_backend::{Backend, BackendError, Dim, LoadOptions, Model, Tensor, TensorInfo};

infl8_backend::export_plugin! {
    name: "crashing",
    version: env!("CARGO_PKG_VERSION"),
    backends: [Box::new(Crashing::Abort), Box::new(Crashing::Hang)],
}

#[derive(Clone, Copy)]
enum Crashing {
    Abort,
    Hang,
}

impl Backend for Crashing {
    fn name(&self) -> &str {
        match self {
            Crashing::Abort => "crash-abort",
            Crashing::Hang => "crash-hang",
        }
    }

    fn description(&self) -> &str {
        "takes the process down in run (conformance kit tests only)"
    }

    fn load(&self, model: &Path, _opts: &LoadOptions) -> Result<Box<dyn Model>, BackendError> {
        if !model.is_file() {
            return Err(BackendError::Load {
                path: model.display().to_string(),
                message: "no such model file".into(),
            });
        }
        let info = |name: &str, c: usize| TensorInfo {
            name: name.into(),
            shape: [Dim::Symbolic("N".into()), Dim::Fixed(c)]
                .into_iter()
                .chain((0..3).map(|i| Dim::Symbolic(format!("S{i}"))))
                .collect(),
        };
        Ok(Box::new(CrashingModel {
            kind: *self,
            input: info("image", 1),
            output: info("logits", 2),
        }))
    }
}

struct CrashingModel {
    kind: Crashing,
    input: TensorInfo,
    output: TensorInfo,
}

impl Model for CrashingModel {
    fn input(&self) -> &TensorInfo {
        &self.input
    }

    fn output(&self) -> &TensorInfo {
        &self.output
    }

    fn run(&self, _data: &[f32], _shape: &[usize]) -> Result<Tensor, BackendError> {
        match self.kind {
            Crashing::Abort => std::process::abort(),
            Crashing::Hang => loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            },
        }
    }
}
