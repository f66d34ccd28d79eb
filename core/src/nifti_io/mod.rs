//! Reading and writing single-file NIfTI-1 images (`.nii`, `.nii.gz`).
//!
//! The `nifti` crate parses the 348-byte header; the voxel data is decoded
//! here instead of through `nifti`'s volume types for three reasons: every
//! size the header declares is validated against the file and the caller's
//! limits *before* anything is allocated, truncated and corrupt gzip streams
//! become precise errors instead of partially filled arrays, and the voxels
//! land directly in [`Volume`](crate::volume::Volume)'s `[C, X, Y, Z]` standard layout without a
//! Fortran-order intermediate copy (which would double peak memory on
//! 512^3 multi-channel inputs).
//!
//! Writers are atomic: output goes to a temporary file in the target
//! directory, is fsynced and then renamed over the target, so a crash or an
//! error never leaves a partial segmentation where a consumer might pick it
//! up.
//!
//! `read.rs` parses, validates and decodes; `affine.rs` derives the
//! voxel-to-world affine (sform, qform, pixdim) and writes geometry back;
//! `write.rs` builds output headers and bodies; `naming.rs` says which
//! file names are NIfTI images and how dataset pairs are named.

mod affine;
pub mod naming;
mod read;
#[cfg(test)]
mod tests;
mod write;

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsio::{self, WriteError};

pub use naming::{PairRole, is_nifti, label_beside, nifti_stem, pair_part, strip_nifti_extension};
pub use read::{read_volume, read_volume_bytes};
pub use write::{write_labels, write_logits, write_volume};

/// Size of a NIfTI-1 header on disk.
const HEADER_SIZE: usize = 348;
/// Raw bytes decoded per step while reading: large enough to amortise the
/// scatter into `[X, Y, Z]`, small enough to stay cache- and memory-friendly.
const SLAB_BYTES: usize = 8 << 20;
/// x-planes scattered together when reading (one cache line of f32).
const X_BLOCK: usize = 16;
/// Smallest voxel edge accepted, in mm. Even micro-CT stays above 1 um; a
/// smaller one is a header in the wrong unit or corrupt, and resampling it
/// to a model's spacing collapses the image to a voxel or two.
pub const MIN_VOXEL_MM: f64 = 1e-3;

#[derive(Debug, thiserror::Error)]
pub enum NiftiIoError {
    #[error("{}: cannot {action}: {source}", .path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{}: invalid NIfTI header: {detail}", .path.display())]
    Header { path: PathBuf, detail: String },
    #[error("{}: unsupported NIfTI file: {detail}", .path.display())]
    Unsupported { path: PathBuf, detail: String },
    #[error(
        "{}: dims {dims:?} declare {voxels} voxels, more than the limit of {max} \
         (limits.max_voxels)",
        .path.display()
    )]
    TooLarge {
        path: PathBuf,
        dims: Vec<u64>,
        voxels: u128,
        max: u64,
    },
    #[error(
        "{}: {what} is {bytes} bytes, more than the limit of {max} (limits.max_input_bytes)",
        .path.display()
    )]
    InputBytes {
        path: PathBuf,
        /// Which size: the file on disk or the voxel data its header declares.
        what: &'static str,
        bytes: u128,
        max: u64,
    },
    #[error("{}: truncated file: {detail}", .path.display())]
    Truncated { path: PathBuf, detail: String },
    #[error("{}: corrupt gzip stream: {source}", .path.display())]
    CorruptGzip {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{}: {count} of {total} voxels are NaN or infinite (the setting \
         limits.nonfinite = \"zero\" replaces them with 0)",
        .path.display()
    )]
    NonFinite {
        path: PathBuf,
        count: u64,
        total: u64,
    },
    #[error("{}: cannot allocate {bytes} bytes for the voxel data", .path.display())]
    Alloc { path: PathBuf, bytes: u128 },
    #[error(
        "{}: the voxels need {} MiB as f32, more than limits.memory_budget_mb = {} MiB",
        .path.display(),
        .bytes.div_ceil(1 << 20),
        .budget_bytes >> 20
    )]
    MemoryBudget {
        path: PathBuf,
        bytes: u128,
        budget_bytes: u64,
    },
    #[error(
        "{}: voxel size {spacing:?} mm (from the {source_name}) is below the minimum of \
         {} mm: a corrupt or mis-scaled header",
        .path.display(),
        MIN_VOXEL_MM
    )]
    TinyVoxels {
        path: PathBuf,
        spacing: [f64; 3],
        source_name: &'static str,
    },
    #[error("{}: cannot write: {detail}", .path.display())]
    InvalidWrite { path: PathBuf, detail: String },
    #[error(transparent)]
    Write(#[from] WriteError),
}

impl NiftiIoError {
    /// Writing failed for a reason of the place written to (a full or
    /// read-only disk, see [`WriteError::is_transient`]), not of the data.
    pub fn is_transient_write(&self) -> bool {
        match self {
            NiftiIoError::Write(w) => w.is_transient(),
            NiftiIoError::Io { action, source, .. } => {
                matches!(*action, "write" | "fsync") && fsio::is_transient_io(source)
            }
            _ => false,
        }
    }
}

/// What to do with NaN / infinite voxel values (after scaling).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonFinite {
    /// Refuse the file: a model fed NaNs produces NaN logits silently.
    #[default]
    Reject,
    /// Replace them with 0 and log a warning.
    Zero,
}

/// Limits applied to untrusted input files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReadLimits {
    /// Largest accepted product of all dims (X * Y * Z * channels).
    pub max_voxels: u64,
    pub allow_nonfinite: NonFinite,
    /// Largest accepted file on disk and largest uncompressed voxel data the
    /// header may declare, in bytes; 0 = no limit beyond `max_voxels`. A
    /// gzip stream that inflates past it is stopped while streaming.
    pub max_input_bytes: u64,
    /// Memory the whole run over one volume may take, in bytes (reading
    /// checks its own f32 copy of the voxels against it; the segmenter
    /// checks the rest of the pipeline); 0 = no limit.
    pub memory_budget_bytes: u64,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            // 512 x 512 x 1024: a whole-body CT; larger is refused from the
            // header before anything is allocated.
            max_voxels: 512 * 512 * 1024,
            allow_nonfinite: NonFinite::Reject,
            max_input_bytes: 0,
            memory_budget_bytes: 0,
        }
    }
}

/// Voxel datatypes this module reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

/// The name some callers use for the datatype of [`write_volume`]'s output.
pub type OutputType = DataType;

impl DataType {
    pub const ALL: [DataType; 10] = [
        DataType::U8,
        DataType::I8,
        DataType::I16,
        DataType::U16,
        DataType::I32,
        DataType::U32,
        DataType::I64,
        DataType::U64,
        DataType::F32,
        DataType::F64,
    ];

    /// The NIfTI-1 `datatype` code.
    pub fn code(self) -> i16 {
        match self {
            DataType::U8 => 2,
            DataType::I16 => 4,
            DataType::I32 => 8,
            DataType::F32 => 16,
            DataType::F64 => 64,
            DataType::I8 => 256,
            DataType::U16 => 512,
            DataType::U32 => 768,
            DataType::I64 => 1024,
            DataType::U64 => 1280,
        }
    }

    pub fn from_code(code: i16) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.code() == code)
    }

    /// Bytes per voxel.
    pub fn size(self) -> usize {
        match self {
            DataType::U8 | DataType::I8 => 1,
            DataType::I16 | DataType::U16 => 2,
            DataType::I32 | DataType::U32 | DataType::F32 => 4,
            DataType::I64 | DataType::U64 | DataType::F64 => 8,
        }
    }
}

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> NiftiIoError + 'a {
    move |source| NiftiIoError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}
