//! Loading a model on the first backend of a fallback chain that can.
//!
//! A chain such as `["ort-tensorrt", "ort-cuda", "tract"]` (see
//! [`crate::config::Settings::backends`]) is tried in order: a backend that
//! is not installed, lacks its hardware or libraries, or refuses the model
//! hands over to the next one, with a warning saying why. If none loads it,
//! the error lists every backend's reason.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{PluginError, PluginHost};
use crate::backend::{Backend, LoadOptions, Model};

/// Why one backend of a chain did not load the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendFailure {
    pub backend: String,
    pub reason: String,
}

impl fmt::Display for BackendFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.backend, self.reason)
    }
}

/// No backend of the chain could load the model.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("no backend to load {} on: the backend chain is empty", .model.display())]
    Empty { model: PathBuf },
    #[error("backend `{}`: {}", .failure.backend, .failure.reason)]
    Single { failure: BackendFailure },
    #[error(
        "none of the backends {} could load {}: {}",
        .failures.iter().map(|f| format!("`{}`", f.backend)).collect::<Vec<_>>().join(", "),
        .model.display(),
        .failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    All {
        model: PathBuf,
        failures: Vec<BackendFailure>,
    },
}

impl ChainError {
    /// Every backend's reason, in chain order.
    pub fn failures(&self) -> &[BackendFailure] {
        match self {
            ChainError::Empty { .. } => &[],
            ChainError::Single { failure } => std::slice::from_ref(failure),
            ChainError::All { failures, .. } => failures,
        }
    }
}

/// A model loaded by the first backend of a chain that could.
pub struct ChainLoad {
    pub backend: Arc<dyn Backend>,
    pub model: Box<dyn Model>,
    /// The backends tried before it, and why each failed.
    pub fell_back: Vec<BackendFailure>,
}

impl fmt::Debug for ChainLoad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainLoad")
            .field("backend", &self.backend.name())
            .field("fell_back", &self.fell_back)
            .finish()
    }
}

/// Loads `model` on the first backend of `chain` that `lookup` provides and
/// that loads it, with the options `options` gives for that backend. Each
/// fallback is logged as a warning with the reason.
pub fn load_with_fallback(
    chain: &[String],
    model: &Path,
    lookup: impl Fn(&str) -> Result<Arc<dyn Backend>, PluginError>,
    options: impl Fn(&str) -> LoadOptions,
) -> Result<ChainLoad, ChainError> {
    let mut failures: Vec<BackendFailure> = Vec::new();
    for (i, name) in chain.iter().enumerate() {
        let attempt = lookup(name).map_err(|e| e.to_string()).and_then(|backend| {
            match backend.load(model, &options(name)) {
                Ok(m) => Ok((backend, m)),
                Err(e) => Err(e.to_string()),
            }
        });
        match attempt {
            Ok((backend, m)) => {
                return Ok(ChainLoad {
                    backend,
                    model: m,
                    fell_back: failures,
                });
            }
            Err(reason) => {
                if let Some(next) = chain.get(i + 1) {
                    tracing::warn!(
                        "backend `{name}` cannot run {}, falling back to `{next}`: {reason}",
                        model.display()
                    );
                }
                failures.push(BackendFailure {
                    backend: name.clone(),
                    reason,
                });
            }
        }
    }
    let model = model.to_path_buf();
    Err(match failures.len() {
        0 => ChainError::Empty { model },
        1 => ChainError::Single {
            failure: failures.remove(0),
        },
        _ => ChainError::All { model, failures },
    })
}

impl PluginHost {
    /// Loads `model` on the first backend of `chain` that this host offers
    /// and that loads it (see [`load_with_fallback`]).
    pub fn load_model(
        &self,
        chain: &[String],
        model: &Path,
        options: impl Fn(&str) -> LoadOptions,
    ) -> Result<ChainLoad, ChainError> {
        load_with_fallback(chain, model, |name| self.backend(name), options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendError, Dim, Tensor, TensorInfo};

    struct Fake {
        name: &'static str,
        fails: Option<&'static str>,
    }

    impl Backend for Fake {
        fn name(&self) -> &str {
            self.name
        }

        fn description(&self) -> &str {
            "fake"
        }

        fn load(&self, model: &Path, opts: &LoadOptions) -> Result<Box<dyn Model>, BackendError> {
            if let Some(why) = self.fails {
                return Err(BackendError::Load {
                    path: model.display().to_string(),
                    message: why.into(),
                });
            }
            let info = TensorInfo {
                name: format!("{}:{}", self.name, opts.threads),
                shape: vec![Dim::Symbolic("N".into())],
            };
            Ok(Box::new(FakeModel(info)))
        }
    }

    struct FakeModel(TensorInfo);

    impl Model for FakeModel {
        fn input(&self) -> &TensorInfo {
            &self.0
        }

        fn output(&self) -> &TensorInfo {
            &self.0
        }

        fn run(&self, data: &[f32], shape: &[usize]) -> Result<Tensor, BackendError> {
            Tensor::from_vec(shape.to_vec(), data.to_vec())
        }
    }

    fn lookup(name: &str) -> Result<Arc<dyn Backend>, PluginError> {
        let fake = |name, fails| Ok(Arc::new(Fake { name, fails }) as Arc<dyn Backend>);
        match name {
            "tract" => fake("tract", None),
            "ort-cpu" => fake("ort-cpu", None),
            "ort-cuda" => fake("ort-cuda", Some("no CUDAExecutionProvider")),
            "ort-tensorrt" => fake("ort-tensorrt", Some("libnvinfer.so.10 is missing")),
            _ => Err(PluginError::UnknownBackend {
                name: name.into(),
                available: vec!["tract".into()],
                searched: vec![],
            }),
        }
    }

    fn chain(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn threads_by_name(name: &str) -> LoadOptions {
        LoadOptions {
            threads: name.len(),
            ..Default::default()
        }
    }

    #[test]
    fn the_first_backend_that_loads_wins() {
        let m = Path::new("m.onnx");
        let got =
            load_with_fallback(&chain(&["ort-cpu", "tract"]), m, lookup, threads_by_name).unwrap();
        assert_eq!(got.backend.name(), "ort-cpu");
        assert!(got.fell_back.is_empty());
        // Each backend gets its own options.
        assert_eq!(got.model.input().name, "ort-cpu:7");
    }

    #[test]
    fn failures_fall_back_in_order_with_their_reasons() {
        let m = Path::new("m.onnx");
        let names = chain(&["ort-tensorrt", "vendor-npu", "ort-cuda", "tract"]);
        let got = load_with_fallback(&names, m, lookup, threads_by_name).unwrap();
        assert_eq!(got.backend.name(), "tract");
        assert_eq!(got.model.input().name, "tract:5");
        let tried: Vec<&str> = got.fell_back.iter().map(|f| f.backend.as_str()).collect();
        assert_eq!(tried, ["ort-tensorrt", "vendor-npu", "ort-cuda"]);
        assert!(got.fell_back[0].reason.contains("libnvinfer.so.10"));
        assert!(
            got.fell_back[1]
                .reason
                .contains("no backend named `vendor-npu`")
        );
        assert!(got.fell_back[2].reason.contains("no CUDAExecutionProvider"));
    }

    #[test]
    fn when_all_fail_the_error_lists_every_reason() {
        let m = Path::new("m.onnx");
        let e = load_with_fallback(&chain(&["ort-tensorrt", "ort-cuda"]), m, lookup, |_| {
            LoadOptions::default()
        })
        .unwrap_err();
        assert_eq!(e.failures().len(), 2);
        let text = e.to_string();
        assert!(
            text.starts_with("none of the backends `ort-tensorrt`, `ort-cuda` could load m.onnx"),
            "{text}"
        );
        assert!(
            text.contains("libnvinfer.so.10") && text.contains("no CUDAExecutionProvider"),
            "{text}"
        );

        // A chain of one keeps the plain message.
        let e = load_with_fallback(&chain(&["nope"]), m, lookup, |_| LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("backend `nope`: no backend named `nope`; available: tract"),
            "{e}"
        );

        let e = load_with_fallback(&[], m, lookup, |_| LoadOptions::default()).unwrap_err();
        assert!(e.to_string().contains("chain is empty"), "{e}");
    }
}
