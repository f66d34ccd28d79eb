//! Why a backend call failed, in kinds that cross the plugin ABI unchanged.

use crate::abi::{
    INFL8_ERROR, INFL8_INVALID_ARGUMENT, INFL8_LOAD_FAILED, INFL8_PANIC, INFL8_RUN_FAILED,
    INFL8_SHAPE_MISMATCH, INFL8_UNAVAILABLE, INFL8_UNSUPPORTED,
};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot load model {path}: {message}")]
    Load { path: String, message: String },
    #[error("model run failed: {0}")]
    Run(String),
    #[error("input shape {got:?} does not fit the model's input {expected}")]
    Shape { got: Vec<usize>, expected: String },
    #[error("backend panicked: {0}")]
    Panic(String),
    /// The backend cannot run on this machine at all (no runtime library,
    /// no GPU, no driver): not a fault of the model or of the plugin.
    #[error("backend unavailable on this machine: {0}")]
    Unavailable(String),
    /// The caller passed something the contract rules out (a bad option
    /// value, an index out of range).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A valid request this backend cannot honour (a precision it lacks):
    /// refused rather than run as something else.
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("{0}")]
    Other(String),
}

/// What kind of failure a [`BackendError`] is: one per ABI error status, so
/// a failure keeps its kind when it crosses a plugin boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// `INFL8_ERROR`: no more specific kind.
    Other,
    /// `INFL8_INVALID_ARGUMENT`.
    InvalidArgument,
    /// `INFL8_PANIC`.
    Panic,
    /// `INFL8_UNSUPPORTED`.
    Unsupported,
    /// `INFL8_LOAD_FAILED`.
    Load,
    /// `INFL8_SHAPE_MISMATCH`.
    Shape,
    /// `INFL8_RUN_FAILED`.
    Run,
    /// `INFL8_UNAVAILABLE` (ABI 1.1).
    Unavailable,
}

impl ErrorKind {
    /// The ABI status a failure of this kind is reported with.
    pub const fn status(self) -> i32 {
        match self {
            ErrorKind::Other => INFL8_ERROR,
            ErrorKind::InvalidArgument => INFL8_INVALID_ARGUMENT,
            ErrorKind::Panic => INFL8_PANIC,
            ErrorKind::Unsupported => INFL8_UNSUPPORTED,
            ErrorKind::Load => INFL8_LOAD_FAILED,
            ErrorKind::Shape => INFL8_SHAPE_MISMATCH,
            ErrorKind::Run => INFL8_RUN_FAILED,
            ErrorKind::Unavailable => INFL8_UNAVAILABLE,
        }
    }

    /// The kind of an ABI error status; `None` for `INFL8_OK`, for
    /// `INFL8_ABI_MISMATCH` (an entry's answer, not a call's failure) and for
    /// codes this ABI does not define.
    pub const fn from_status(status: i32) -> Option<ErrorKind> {
        Some(match status {
            INFL8_ERROR => ErrorKind::Other,
            INFL8_INVALID_ARGUMENT => ErrorKind::InvalidArgument,
            INFL8_PANIC => ErrorKind::Panic,
            INFL8_UNSUPPORTED => ErrorKind::Unsupported,
            INFL8_LOAD_FAILED => ErrorKind::Load,
            INFL8_SHAPE_MISMATCH => ErrorKind::Shape,
            INFL8_RUN_FAILED => ErrorKind::Run,
            INFL8_UNAVAILABLE => ErrorKind::Unavailable,
            _ => return None,
        })
    }
}

impl BackendError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            BackendError::Load { .. } => ErrorKind::Load,
            BackendError::Run(_) => ErrorKind::Run,
            BackendError::Shape { .. } => ErrorKind::Shape,
            BackendError::Panic(_) => ErrorKind::Panic,
            BackendError::Unavailable(_) => ErrorKind::Unavailable,
            BackendError::InvalidArgument(_) => ErrorKind::InvalidArgument,
            BackendError::Unsupported(_) => ErrorKind::Unsupported,
            BackendError::Other(_) => ErrorKind::Other,
        }
    }

    /// The part of the error that crosses the ABI next to its status: the
    /// receiving side rebuilds the rest (the model path it loaded, the shape
    /// it passed), so nothing is said twice.
    pub fn into_message(self) -> String {
        match self {
            BackendError::Load { message, .. } => message,
            BackendError::Shape { expected, .. } => expected,
            BackendError::Run(m)
            | BackendError::Panic(m)
            | BackendError::Unavailable(m)
            | BackendError::InvalidArgument(m)
            | BackendError::Unsupported(m)
            | BackendError::Other(m) => m,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{INFL8_ABI_MISMATCH, INFL8_OK};

    #[test]
    fn kinds_and_statuses_map_both_ways() {
        for status in 0..=9 {
            match ErrorKind::from_status(status) {
                Some(kind) => assert_eq!(kind.status(), status),
                None => assert!(matches!(status, INFL8_OK | INFL8_ABI_MISMATCH), "{status}"),
            }
        }
        assert_eq!(ErrorKind::from_status(42), None);
    }

    #[test]
    fn only_the_message_crosses() {
        let e = BackendError::Load {
            path: "m.onnx".into(),
            message: "no such file".into(),
        };
        assert_eq!(e.kind().status(), INFL8_LOAD_FAILED);
        assert_eq!(e.into_message(), "no such file");
        let e = BackendError::Shape {
            got: vec![1, 2],
            expected: "x [N, 3]".into(),
        };
        assert_eq!(e.kind(), ErrorKind::Shape);
        assert_eq!(e.into_message(), "x [N, 3]");
    }
}
