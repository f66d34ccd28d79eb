//! What a compute backend offers the runtime: load a model, describe its
//! I/O, run a batch. In-process implementations (tests) and plugins loaded
//! from shared libraries (infl8-core's plugin host) both implement these
//! traits.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{BackendError, Precision};

/// One dimension of a model tensor: a fixed size, or symbolic (e.g. the batch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dim {
    Fixed(usize),
    Symbolic(String),
}

impl Dim {
    pub fn fixed(&self) -> Option<usize> {
        match self {
            Dim::Fixed(n) => Some(*n),
            Dim::Symbolic(_) => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbolic(s) => write!(f, "{s}"),
        }
    }
}

/// Name and shape of a model input or output (f32 only in ABI v1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<Dim>,
}

impl TensorInfo {
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Does a concrete shape fit this (possibly symbolic) shape?
    pub fn accepts(&self, shape: &[usize]) -> bool {
        shape.len() == self.shape.len()
            && self
                .shape
                .iter()
                .zip(shape)
                .all(|(d, &n)| d.fixed().is_none_or(|f| f == n))
    }

    /// The check every `Model::run` makes before touching its engine: the
    /// shape fits this input and `len` values fill it exactly.
    pub fn check_run_input(&self, len: usize, shape: &[usize]) -> Result<(), BackendError> {
        if !self.accepts(shape) {
            return Err(BackendError::Shape {
                got: shape.to_vec(),
                expected: self.to_string(),
            });
        }
        let want = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if want != Some(len) {
            return Err(BackendError::Other(format!(
                "input holds {len} values, shape {shape:?} needs {}",
                want.map_or_else(|| "more than usize::MAX".into(), |n| n.to_string())
            )));
        }
        Ok(())
    }
}

impl fmt::Display for TensorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        write!(f, "{} [{}]", self.name, dims.join(", "))
    }
}

/// Options handed to a backend when it loads a model. Crosses the plugin
/// boundary as JSON, so new keys never change the ABI.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadOptions {
    /// Worker threads the backend may use; 0 = backend's choice.
    #[serde(default)]
    pub threads: usize,
    /// Backend-specific settings (e.g. TensorRT cache dirs), passed through.
    /// The runtime's settings also mirror `precision` here, verbatim from a
    /// backend's own table when it has one: plugins written against the
    /// first options format (the SDK's C example among them) read it there.
    #[serde(default)]
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Arithmetic the backend may use (the settings' `precision`). A backend
    /// that cannot honour it warns or refuses; it never fails silently.
    // Serialised after `extra`, so a plugin that takes the first
    // `"precision"` of the JSON text still finds the backend's own value.
    #[serde(default)]
    pub precision: Precision,
}

/// The `extra` key of a backend's own precision (mirrored from the typed
/// field by the infl8 host).
pub const PRECISION_KEY: &str = "precision";

impl LoadOptions {
    /// The precision to load with: `extra`'s `precision` when present (a
    /// backend's own setting, checked here), else [`LoadOptions::precision`].
    pub fn requested_precision(&self) -> Result<Precision, BackendError> {
        match self.extra.get(PRECISION_KEY) {
            None => Ok(self.precision),
            Some(value) => value.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
                BackendError::InvalidArgument(format!(
                    "{PRECISION_KEY}: expected fp32, fp16 or int8, got {value}"
                ))
            }),
        }
    }
}

/// A buffer owned by someone else (a plugin), released when dropped.
pub trait ForeignBuffer: Send {
    fn as_slice(&self) -> &[f32];
}

enum Storage {
    Owned(Vec<f32>),
    Foreign(Box<dyn ForeignBuffer>),
}

/// A dense, contiguous f32 tensor in C order.
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    pub fn from_vec(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, BackendError> {
        check_len(&shape, data.len())?;
        Ok(Tensor {
            shape,
            storage: Storage::Owned(data),
        })
    }

    /// Wraps a buffer a plugin allocated, without copying it.
    pub fn from_foreign(
        shape: Vec<usize>,
        buf: Box<dyn ForeignBuffer>,
    ) -> Result<Self, BackendError> {
        check_len(&shape, buf.as_slice().len())?;
        Ok(Tensor {
            shape,
            storage: Storage::Foreign(buf),
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &[f32] {
        match &self.storage {
            Storage::Owned(v) => v,
            Storage::Foreign(b) => b.as_slice(),
        }
    }

    pub fn into_vec(self) -> Vec<f32> {
        match self.storage {
            Storage::Owned(v) => v,
            Storage::Foreign(b) => b.as_slice().to_vec(),
        }
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("shape", &self.shape)
            .finish()
    }
}

fn check_len(shape: &[usize], len: usize) -> Result<(), BackendError> {
    let want = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| BackendError::Other(format!("tensor shape {shape:?} overflows")))?;
    if want != len {
        return Err(BackendError::Other(format!(
            "tensor shape {shape:?} needs {want} values, buffer has {len}"
        )));
    }
    Ok(())
}

/// A compute backend (tract, ONNX Runtime, a vendor's accelerator...).
pub trait Backend: Send + Sync {
    /// Unique name users select it by (`tract`, `ort-cuda`, ...).
    fn name(&self) -> &str;
    /// One line for `infl8 plugins`.
    fn description(&self) -> &str;
    fn load(&self, model: &Path, opts: &LoadOptions) -> Result<Box<dyn Model>, BackendError>;
    /// Checks `opts` as `load` would read them, without a model. An `extra`
    /// key that no backend of the plugin reads, or a bad value, is an
    /// [`BackendError::InvalidArgument`] whose message starts with the key
    /// (`key: problem`). On success, notes on what the backend accepts but
    /// cannot honour (a precision it has no switch for, a key for another
    /// backend of the plugin), each starting with its key the same way.
    /// The default answers [`BackendError::Unsupported`]: this backend does
    /// not check.
    fn check_options(&self, opts: &LoadOptions) -> Result<Vec<String>, BackendError> {
        let _ = opts;
        Err(BackendError::Unsupported(format!(
            "backend {} does not check its options",
            self.name()
        )))
    }
}

/// A model loaded by a backend, ready to run batches. One input, one output.
pub trait Model: Send + Sync {
    fn input(&self) -> &TensorInfo;
    fn output(&self) -> &TensorInfo;
    /// Runs one batch. `data` is contiguous f32 in C order with `shape`
    /// (batch first). Implementations may run the batch's items in parallel.
    fn run(&self, data: &[f32], shape: &[usize]) -> Result<Tensor, BackendError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbolic_dims_accept_any_size() {
        let info = TensorInfo {
            name: "x".into(),
            shape: vec![Dim::Symbolic("N".into()), Dim::Fixed(1), Dim::Fixed(8)],
        };
        assert!(info.accepts(&[3, 1, 8]));
        assert!(!info.accepts(&[3, 2, 8]));
        assert!(!info.accepts(&[3, 1]));
    }

    #[test]
    fn tensor_checks_length() {
        assert!(Tensor::from_vec(vec![2, 3], vec![0.0; 6]).is_ok());
        assert!(Tensor::from_vec(vec![2, 3], vec![0.0; 5]).is_err());
        assert!(Tensor::from_vec(vec![usize::MAX, 3], vec![]).is_err());
    }

    #[test]
    fn precision_comes_from_extra_first() {
        let mut opts = LoadOptions {
            precision: Precision::Fp16,
            ..Default::default()
        };
        assert_eq!(opts.requested_precision().unwrap(), Precision::Fp16);
        opts.extra.insert("precision".into(), "INT8".into());
        assert_eq!(opts.requested_precision().unwrap(), Precision::Int8);
        opts.extra.insert("precision".into(), "fp8".into());
        let e = opts.requested_precision().unwrap_err();
        assert!(
            matches!(&e, BackendError::InvalidArgument(m) if m.contains("fp8")),
            "{e}"
        );
    }

    #[test]
    fn options_without_precision_read_as_fp32() {
        let opts: LoadOptions = serde_json::from_str(r#"{"threads": 2, "extra": {}}"#).unwrap();
        assert_eq!((opts.threads, opts.precision), (2, Precision::Fp32));
    }
}
