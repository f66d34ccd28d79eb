//! What a failed volume failed on, from the error's type: the input itself
//! (corrupt, truncated, unsupported), a limit it passes, the backend, the
//! clock, or the disk. A service files failures by this (the watch
//! journal's `kind`); rewording a message never changes it.

use serde::{Deserialize, Serialize};

use crate::budget::BudgetError;
use crate::engine::{EngineError, TimedOut};
use crate::fsio::WriteError;
use crate::inference::InferenceError;
use crate::nifti_io::NiftiIoError;
use crate::preprocess::PreprocessError;
use crate::segment::SegmentError;
use infl8_backend::BackendError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The file is not a volume this runtime can read or use.
    Input,
    /// One of the settings' `limits` refuses it.
    Limit,
    /// The model or its plugin failed on it.
    Backend,
    /// It took longer than `limits.timeout_s`.
    Timeout,
    /// Reading or writing a file failed.
    Io,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Input => "input",
            FailureKind::Limit => "limit",
            FailureKind::Backend => "backend",
            FailureKind::Timeout => "timeout",
            FailureKind::Io => "io",
        }
    }

    /// The kind of the first error in `chain` (an error and its sources)
    /// that this crate knows, or `None`.
    pub fn of_chain<'a>(
        chain: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>,
    ) -> Option<FailureKind> {
        chain.into_iter().find_map(FailureKind::of)
    }

    /// The kind of `e` when it is one of this crate's errors.
    pub fn of(e: &(dyn std::error::Error + 'static)) -> Option<FailureKind> {
        if e.downcast_ref::<TimedOut>().is_some() {
            return Some(FailureKind::Timeout);
        }
        if let Some(e) = e.downcast_ref::<EngineError>() {
            return Some(match e {
                EngineError::OverBudget(_) => FailureKind::Limit,
                EngineError::Chain(_) => FailureKind::Backend,
                EngineError::Manifest(_) => FailureKind::Input,
            });
        }
        if let Some(e) = e.downcast_ref::<SegmentError>() {
            return Some(e.failure_kind());
        }
        if let Some(e) = e.downcast_ref::<NiftiIoError>() {
            return Some(e.failure_kind());
        }
        if let Some(e) = e.downcast_ref::<BudgetError>() {
            return Some(e.failure_kind());
        }
        if let Some(e) = e.downcast_ref::<InferenceError>() {
            return Some(e.failure_kind());
        }
        if e.downcast_ref::<PreprocessError>().is_some() {
            return Some(FailureKind::Input);
        }
        if e.downcast_ref::<BackendError>().is_some() {
            return Some(FailureKind::Backend);
        }
        if e.downcast_ref::<WriteError>().is_some() {
            return Some(FailureKind::Io);
        }
        if e.downcast_ref::<std::io::Error>().is_some() {
            return Some(FailureKind::Io);
        }
        None
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl NiftiIoError {
    pub fn failure_kind(&self) -> FailureKind {
        match self {
            NiftiIoError::Io { .. }
            | NiftiIoError::InvalidWrite { .. }
            | NiftiIoError::Write(_) => FailureKind::Io,
            NiftiIoError::TooLarge { .. }
            | NiftiIoError::InputBytes { .. }
            | NiftiIoError::NonFinite { .. }
            | NiftiIoError::Alloc { .. }
            | NiftiIoError::MemoryBudget { .. } => FailureKind::Limit,
            NiftiIoError::Header { .. }
            | NiftiIoError::Unsupported { .. }
            | NiftiIoError::Truncated { .. }
            | NiftiIoError::CorruptGzip { .. }
            | NiftiIoError::TinyVoxels { .. } => FailureKind::Input,
        }
    }
}

impl BudgetError {
    pub fn failure_kind(&self) -> FailureKind {
        match self {
            BudgetError::Geometry(_) => FailureKind::Input,
            BudgetError::TooManyVoxels { .. } | BudgetError::OverBudget { .. } => {
                FailureKind::Limit
            }
        }
    }
}

impl InferenceError {
    pub fn failure_kind(&self) -> FailureKind {
        match self {
            InferenceError::Backend(_) => FailureKind::Backend,
            // The model computed NaN or fits no input: the model's fault.
            InferenceError::ModelInput { .. }
            | InferenceError::ModelOutput { .. }
            | InferenceError::ClassCount(_)
            | InferenceError::NanLogit { .. } => FailureKind::Backend,
            InferenceError::Settings(_) | InferenceError::Image(_) | InferenceError::Shape(_) => {
                FailureKind::Input
            }
        }
    }
}

impl SegmentError {
    pub fn failure_kind(&self) -> FailureKind {
        match self {
            SegmentError::Nifti(e) => e.failure_kind(),
            SegmentError::Input { .. } | SegmentError::Preprocess { .. } => FailureKind::Input,
            SegmentError::Budget { source, .. } => source.failure_kind(),
            SegmentError::Inference { source, .. } => source.failure_kind(),
            SegmentError::TimedOut(_) => FailureKind::Timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn limits_input_and_backend_are_told_apart_through_wrappers() {
        let too_large = SegmentError::Nifti(NiftiIoError::TooLarge {
            path: PathBuf::from("x.nii"),
            dims: vec![10],
            voxels: 10,
            max: 1,
        });
        assert_eq!(too_large.failure_kind(), FailureKind::Limit);
        let truncated = NiftiIoError::Truncated {
            path: PathBuf::from("x.nii"),
            detail: "short".into(),
        };
        assert_eq!(FailureKind::of(&truncated), Some(FailureKind::Input));
        let backend = SegmentError::Inference {
            path: PathBuf::from("x.nii"),
            source: InferenceError::Backend(BackendError::Run("boom".into())),
        };
        assert_eq!(FailureKind::of(&backend), Some(FailureKind::Backend));
        let other = std::fmt::Error;
        assert_eq!(FailureKind::of(&other), None);
        assert_eq!(
            serde_json::to_string(&FailureKind::Timeout).unwrap(),
            "\"timeout\""
        );
    }
}
