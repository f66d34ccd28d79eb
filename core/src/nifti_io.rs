//! Reading and writing single-file NIfTI-1 images (`.nii`, `.nii.gz`).
//!
//! The `nifti` crate parses the 348-byte header; the voxel data is decoded
//! here instead of through `nifti`'s volume types for three reasons: every
//! size the header declares is validated against the file and the caller's
//! limits *before* anything is allocated, truncated and corrupt gzip streams
//! become precise errors instead of partially filled arrays, and the voxels
//! land directly in [`Volume`]'s `[C, X, Y, Z]` standard layout without a
//! Fortran-order intermediate copy (which would double peak memory on
//! 512^3 multi-channel inputs).
//!
//! Writers are atomic: output goes to a temporary file in the target
//! directory, is fsynced and then renamed over the target, so a crash or an
//! error never leaves a partial segmentation where a consumer might pick it
//! up.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use flate2::Compression;
use flate2::bufread::GzDecoder;
use flate2::write::GzEncoder;
use nalgebra::{Matrix3, Matrix4};
use ndarray::{ArrayView3, ArrayView4, Axis, s};
use nifti::{Endianness, NiftiHeader, XForm};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::fsio::{self, WriteError};
use crate::volume::{Volume, spacing_of};

/// Size of a NIfTI-1 header on disk.
const HEADER_SIZE: usize = 348;
/// Where our writers put the voxels: header plus the 4-byte extension flag.
const OUT_VOX_OFFSET: usize = 352;
/// DEFLATE cannot expand data by more than ~1032:1, so a compressed file
/// smaller than `declared / GZ_MAX_RATIO` is certainly truncated. Checking
/// this up front stops a tiny hostile `.nii.gz` from making us allocate
/// gigabytes before its stream runs dry.
const GZ_MAX_RATIO: u64 = 1100;
/// Raw bytes decoded per step while reading: large enough to amortise the
/// scatter into `[X, Y, Z]`, small enough to stay cache- and memory-friendly.
const SLAB_BYTES: usize = 8 << 20;
/// x-planes scattered together when reading (one cache line of f32).
const X_BLOCK: usize = 16;
/// NIfTI-1 stores sizes as signed 16-bit integers.
const MAX_DIM: usize = i16::MAX as usize;
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

/// Names of the NIfTI datatypes we refuse, so the error says what the file is.
fn unsupported_datatype_name(code: i16) -> &'static str {
    match code {
        0 => "unknown",
        1 => "binary",
        32 => "complex64",
        128 => "rgb24",
        1536 => "float128",
        1792 => "complex128",
        2048 => "complex256",
        2304 => "rgba32",
        _ => "not a NIfTI-1 datatype",
    }
}

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> NiftiIoError + 'a {
    move |source| NiftiIoError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

fn header_err(path: &Path, detail: impl Into<String>) -> NiftiIoError {
    NiftiIoError::Header {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// Classify an error met while reading `what` from the (possibly
/// decompressing) stream.
fn read_err(path: &Path, gz: bool, what: &str, e: io::Error) -> NiftiIoError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => NiftiIoError::Truncated {
            path: path.to_path_buf(),
            detail: format!("the file ends inside the {what}"),
        },
        // flate2 reports bad deflate data, bad gzip headers and checksum
        // mismatches as InvalidInput / InvalidData.
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData if gz => {
            NiftiIoError::CorruptGzip {
                path: path.to_path_buf(),
                source: e,
            }
        }
        _ => NiftiIoError::Io {
            path: path.to_path_buf(),
            action: "read",
            source: e,
        },
    }
}

/// Where the affine of a file came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AffineSource {
    Sform,
    Qform,
    Pixdim,
}

/// Header fields validated and decoded into what the reader needs.
#[derive(Debug)]
struct Layout {
    dims: [usize; 3],
    channels: usize,
    datatype: DataType,
    vox_offset: u64,
    /// `(slope, inter)` when the header asks for scaling.
    scaling: Option<(f64, f64)>,
}

/// Read a `.nii` or `.nii.gz` file (gzip is detected from the magic bytes,
/// not the name) into a [`Volume`] with data `[C, X, Y, Z]`, the affine in
/// RAS millimetres and the original header kept for writing results back.
pub fn read_volume(path: &Path, limits: &ReadLimits) -> Result<Volume, NiftiIoError> {
    let file = File::open(path).map_err(io_err(path, "open"))?;
    let file_len = file.metadata().map_err(io_err(path, "stat"))?.len();
    read_volume_from(
        path,
        BufReader::with_capacity(1 << 20, file),
        file_len,
        limits,
    )
}

/// [`read_volume`] for a file already in memory (a network upload, a fuzzer's
/// input): the same checks and errors, with `name` standing in for the path
/// in error messages.
pub fn read_volume_bytes(
    name: &Path,
    bytes: &[u8],
    limits: &ReadLimits,
) -> Result<Volume, NiftiIoError> {
    read_volume_from(name, bytes, bytes.len() as u64, limits)
}

/// The reader behind [`read_volume`]: `file_len` is the size of the whole
/// (possibly compressed) input, which bounds what its header may declare.
fn read_volume_from<R: BufRead>(
    path: &Path,
    mut buffered: R,
    file_len: u64,
    limits: &ReadLimits,
) -> Result<Volume, NiftiIoError> {
    if limits.max_input_bytes > 0 && file_len > limits.max_input_bytes {
        return Err(NiftiIoError::InputBytes {
            path: path.to_path_buf(),
            what: "the file",
            bytes: u128::from(file_len),
            max: limits.max_input_bytes,
        });
    }
    let gz = {
        let head = buffered.fill_buf().map_err(io_err(path, "read"))?;
        head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b
    };
    // How much the gzip stream may inflate to: unknown until the header
    // gives vox_offset, then the header, extensions and max_input_bytes.
    let inflate_limit = Rc::new(Cell::new(u64::MAX));
    let mut src: Box<dyn Read + '_> = if gz {
        // A gzip bomb is stopped while it inflates, not after.
        Box::new(CappedInflate {
            inner: GzMembers::new(buffered),
            seen: 0,
            limit: inflate_limit.clone(),
            max: limits.max_input_bytes,
        })
    } else {
        Box::new(buffered)
    };

    let mut raw_header = [0u8; HEADER_SIZE];
    src.read_exact(&mut raw_header)
        .map_err(|e| read_err(path, gz, "348-byte header", e))?;
    let header = parse_header(path, &raw_header)?;
    let layout = validate_header(path, &header, limits, file_len, gz)?;
    if limits.max_input_bytes > 0 {
        inflate_limit.set(layout.vox_offset.saturating_add(limits.max_input_bytes));
    }
    let (affine, source) = header_affine(&header);
    if header.sform_code > 0 && source != AffineSource::Sform {
        tracing::warn!(
            path = ?path,
            "sform_code > 0 but the sform is degenerate or not finite; ignoring it"
        );
    }
    if header.qform_code > 0 && source == AffineSource::Pixdim {
        tracing::warn!(
            path = ?path,
            "qform_code > 0 but the qform is degenerate or not finite; ignoring it"
        );
    }
    if source == AffineSource::Pixdim {
        tracing::warn!(
            path = ?path,
            "no usable sform or qform: using an ANALYZE-style pixdim-diagonal affine; \
             the orientation of this image is unknown"
        );
    }
    if !affine_is_valid(&affine) {
        return Err(header_err(
            path,
            format!("degenerate voxel-to-world affine {affine:?}"),
        ));
    }
    let spacing = spacing_of(&affine);
    if spacing.iter().any(|&s| s < MIN_VOXEL_MM) {
        return Err(NiftiIoError::TinyVoxels {
            path: path.to_path_buf(),
            spacing,
            source_name: match source {
                AffineSource::Sform => "sform",
                AffineSource::Qform => "qform",
                AffineSource::Pixdim => "pixdim",
            },
        });
    }

    // Skip extensions between the header and the voxels.
    let skip = layout.vox_offset - HEADER_SIZE as u64;
    let skipped = io::copy(&mut src.by_ref().take(skip), &mut io::sink())
        .map_err(|e| read_err(path, gz, "header extensions", e))?;
    if skipped != skip {
        return Err(NiftiIoError::Truncated {
            path: path.to_path_buf(),
            detail: format!("the file ends before vox_offset {}", layout.vox_offset),
        });
    }

    let [nx, ny, nz] = layout.dims;
    let per_channel = nx * ny * nz;
    let total = per_channel * layout.channels;
    let f32_bytes = total as u128 * 4;
    if limits.memory_budget_bytes > 0 && f32_bytes > u128::from(limits.memory_budget_bytes) {
        return Err(NiftiIoError::MemoryBudget {
            path: path.to_path_buf(),
            bytes: f32_bytes,
            budget_bytes: limits.memory_budget_bytes,
        });
    }
    let mut data: Vec<f32> = Vec::new();
    data.try_reserve_exact(total)
        .map_err(|_| NiftiIoError::Alloc {
            path: path.to_path_buf(),
            bytes: total as u128 * 4,
        })?;
    data.resize(total, 0.0);

    let elem = layout.datatype.size();
    let slice_len = nx * ny;
    let slab_z = (SLAB_BYTES / (slice_len * elem)).clamp(1, nz);
    let mut raw = vec![0u8; slab_z * slice_len * elem];
    let mut decoded = vec![0f32; slab_z * slice_len];
    let big = header.endianness == Endianness::Big;
    let mut nonfinite = 0u64;
    for channel in data.chunks_exact_mut(per_channel) {
        let mut z0 = 0;
        while z0 < nz {
            let dz = slab_z.min(nz - z0);
            let n = dz * slice_len;
            src.read_exact(&mut raw[..n * elem])
                .map_err(|e| read_err(path, gz, "voxel data", e))?;
            nonfinite += decode(
                layout.datatype,
                big,
                layout.scaling,
                &raw[..n * elem],
                &mut decoded[..n],
            );
            // The file runs x fastest; Volume runs z fastest. Each x owns a
            // contiguous [Y, Z] plane of the output, so blocks of X_BLOCK
            // planes scatter in parallel without sharing, and both sides stay
            // cache-friendly: reads are short contiguous runs of x, writes
            // run along z.
            let decoded = &decoded[..n];
            channel
                .par_chunks_mut(X_BLOCK * ny * nz)
                .enumerate()
                .for_each(|(b, planes)| {
                    let x0 = b * X_BLOCK;
                    let xb = planes.len() / (ny * nz);
                    for y in 0..ny {
                        for k in 0..dz {
                            let start = (k * ny + y) * nx + x0;
                            for (dx, v) in decoded[start..start + xb].iter().enumerate() {
                                planes[(dx * ny + y) * nz + z0 + k] = *v;
                            }
                        }
                    }
                });
            z0 += dz;
        }
    }
    if gz {
        // Reading to the end makes flate2 verify the CRC and length trailer,
        // which catches corruption the deflate decoder itself cannot see.
        // A valid file has nothing after the voxels; inflating more than
        // the image itself again is a bomb, not padding.
        let image = layout.vox_offset + total as u64 * elem as u64;
        let trailing = io::copy(&mut src.by_ref().take(image + 1), &mut io::sink())
            .map_err(|e| read_err(path, gz, "gzip stream after the voxel data", e))?;
        if trailing > image {
            return Err(NiftiIoError::Unsupported {
                path: path.to_path_buf(),
                detail: format!(
                    "the gzip stream inflates to more than {image} bytes after the \
                     {image}-byte image: not a NIfTI file, or a gzip bomb"
                ),
            });
        }
    }

    if nonfinite > 0 {
        match limits.allow_nonfinite {
            NonFinite::Reject => {
                return Err(NiftiIoError::NonFinite {
                    path: path.to_path_buf(),
                    count: nonfinite,
                    total: total as u64,
                });
            }
            NonFinite::Zero => {
                tracing::warn!(
                    path = ?path,
                    count = nonfinite,
                    "replacing NaN/infinite voxels with 0"
                );
                data.par_iter_mut()
                    .filter(|v| !v.is_finite())
                    .for_each(|v| *v = 0.0);
            }
        }
    }

    let data = ndarray::Array4::from_shape_vec((layout.channels, nx, ny, nz), data)
        .map_err(|e| header_err(path, format!("inconsistent dims: {e}")))?;
    Ok(Volume {
        data,
        affine,
        spacing,
        header: Some(header),
    })
}

/// Inflated bytes, refused once more than `limit` came out (the header and
/// extensions plus `limits.max_input_bytes` = `max`): the header's declared
/// size is checked before, this stops a stream that inflates past it while
/// it streams.
struct CappedInflate<R> {
    inner: R,
    seen: u64,
    limit: Rc<Cell<u64>>,
    max: u64,
}

impl<R: Read> Read for CappedInflate<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen = self.seen.saturating_add(n as u64);
        if self.seen > self.limit.get() {
            return Err(io::Error::other(format!(
                "the gzip stream inflates past limits.max_input_bytes = {} bytes of voxel data",
                self.max
            )));
        }
        Ok(n)
    }
}

/// A gzip stream of one or more members (as bgzip and concatenation
/// produce), tolerating zero padding after the last member the way
/// Python's `gzip` (and so nibabel) does. flate2's `MultiGzDecoder` refuses
/// such padding as an invalid header.
struct GzMembers<R: BufRead> {
    member: Option<GzDecoder<R>>,
}

impl<R: BufRead> GzMembers<R> {
    fn new(inner: R) -> Self {
        GzMembers {
            member: Some(GzDecoder::new(inner)),
        }
    }
}

impl<R: BufRead> Read for GzMembers<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let Some(member) = self.member.as_mut() else {
                return Ok(0);
            };
            let n = member.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            // The member ended and its CRC and length checked out. The
            // bufread decoder consumed exactly the member, so what follows
            // is either another member, zero padding or the end.
            let Some(mut inner) = self.member.take().map(GzDecoder::into_inner) else {
                return Ok(0);
            };
            loop {
                let avail = inner.fill_buf()?;
                if avail.is_empty() {
                    return Ok(0);
                }
                let zeros = avail.iter().take_while(|&&b| b == 0).count();
                if zeros == 0 {
                    break;
                }
                inner.consume(zeros);
            }
            self.member = Some(GzDecoder::new(inner));
        }
    }
}

fn parse_header(path: &Path, raw: &[u8; HEADER_SIZE]) -> Result<NiftiHeader, NiftiIoError> {
    let sizeof_le = i32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let sizeof_be = i32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
    if sizeof_le == 540 || sizeof_be == 540 {
        return Err(NiftiIoError::Unsupported {
            path: path.to_path_buf(),
            detail: "NIfTI-2 files are not supported (convert to NIfTI-1)".into(),
        });
    }
    // The `nifti` crate guesses the byte order from dim[0] and reads a bad
    // dim[0] as a byte-swapped header; sizeof_hdr (always 348) settles the
    // order, so a bad dim[0] is reported as itself.
    let big = match (sizeof_le, sizeof_be) {
        (348, _) => false,
        (_, 348) => true,
        _ => {
            return Err(header_err(
                path,
                format!(
                    "sizeof_hdr is {sizeof_le} (must be 348; not a NIfTI-1 file, or a corrupt one)"
                ),
            ));
        }
    };
    let dim0 = if big {
        i16::from_be_bytes([raw[40], raw[41]])
    } else {
        i16::from_le_bytes([raw[40], raw[41]])
    };
    if !(1..=7).contains(&dim0) {
        return Err(header_err(path, format!("dim[0] = {dim0} (must be 1..=7)")));
    }
    let header = NiftiHeader::from_reader(&raw[..]).map_err(|e| {
        header_err(
            path,
            format!("{e} (bad magic: not a NIfTI-1 file, or a corrupt one)"),
        )
    })?;
    if header.sizeof_hdr != HEADER_SIZE as i32 {
        return Err(header_err(
            path,
            format!("sizeof_hdr is {} (must be 348)", header.sizeof_hdr),
        ));
    }
    if &header.magic != b"n+1\0" {
        return Err(NiftiIoError::Unsupported {
            path: path.to_path_buf(),
            detail: "this is the header of a .hdr/.img pair (magic \"ni1\"); only single-file \
                     .nii/.nii.gz images are supported"
                .into(),
        });
    }
    Ok(header)
}

/// Check everything the header declares before any voxel is allocated.
fn validate_header(
    path: &Path,
    h: &NiftiHeader,
    limits: &ReadLimits,
    file_len: u64,
    gz: bool,
) -> Result<Layout, NiftiIoError> {
    // NIfTI-1 sizes are signed 16-bit; the nifti crate hands them out as u16.
    let rank = h.dim[0] as i16;
    if !(1..=7).contains(&rank) {
        return Err(header_err(path, format!("dim[0] = {rank} (must be 1..=7)")));
    }
    let rank = rank as usize;
    let mut sizes = [1u64; 7];
    for i in 1..=rank {
        let d = h.dim[i] as i16;
        if d <= 0 {
            return Err(header_err(
                path,
                format!("dim[{i}] = {d} (sizes must be positive)"),
            ));
        }
        sizes[i - 1] = d as u64;
    }
    let voxels = sizes
        .iter()
        .try_fold(1u128, |acc, &d| acc.checked_mul(u128::from(d)));
    let voxels = match voxels {
        Some(v) if v <= u128::from(limits.max_voxels) => v,
        other => {
            return Err(NiftiIoError::TooLarge {
                path: path.to_path_buf(),
                dims: sizes[..rank].to_vec(),
                voxels: other.unwrap_or(u128::MAX),
                max: limits.max_voxels,
            });
        }
    };
    let extra: Vec<u64> = sizes[3..].iter().copied().filter(|&d| d > 1).collect();
    if extra.len() > 1 {
        return Err(NiftiIoError::Unsupported {
            path: path.to_path_buf(),
            detail: format!(
                "dims {:?} have more than one non-singleton axis beyond X, Y, Z \
                 (e.g. a time series of vector images); only one channel axis is supported",
                &sizes[..rank]
            ),
        });
    }

    let datatype = DataType::from_code(h.datatype).ok_or_else(|| NiftiIoError::Unsupported {
        path: path.to_path_buf(),
        detail: format!(
            "datatype {} ({}); supported: u8, i8, i16, u16, i32, u32, i64, u64, f32, f64",
            h.datatype,
            unsupported_datatype_name(h.datatype)
        ),
    })?;

    // A 1D/2D image has no meaningful pixdim along its missing axes.
    for i in 1..=rank.min(3) {
        let p = h.pixdim[i];
        if !p.is_finite() || p <= 0.0 {
            return Err(header_err(
                path,
                format!("pixdim[{i}] = {p} (voxel sizes must be finite and > 0)"),
            ));
        }
    }

    let vox = h.vox_offset;
    if !vox.is_finite() || vox < HEADER_SIZE as f32 || vox.fract() != 0.0 {
        return Err(header_err(
            path,
            format!("vox_offset = {vox} (must be a whole byte offset >= 348)"),
        ));
    }
    let vox_offset = vox as u64;
    let data_bytes = voxels * datatype.size() as u128;
    // Checked from the header alone: a small .nii.gz may inflate to far more.
    if limits.max_input_bytes > 0 && data_bytes > u128::from(limits.max_input_bytes) {
        return Err(NiftiIoError::InputBytes {
            path: path.to_path_buf(),
            what: "the voxel data the header declares",
            bytes: data_bytes,
            max: limits.max_input_bytes,
        });
    }
    let needed = u128::from(vox_offset) + data_bytes;
    if gz {
        if u128::from(file_len) * u128::from(GZ_MAX_RATIO) < needed {
            return Err(NiftiIoError::Truncated {
                path: path.to_path_buf(),
                detail: format!(
                    "the header declares {needed} bytes of image but the gzip file has only \
                     {file_len} bytes, more than DEFLATE can ever expand"
                ),
            });
        }
    } else if u128::from(file_len) < needed {
        return Err(NiftiIoError::Truncated {
            path: path.to_path_buf(),
            detail: format!(
                "the file has {file_len} bytes but the header declares {needed} \
                 (vox_offset {vox_offset} + {voxels} voxels x {} bytes)",
                datatype.size()
            ),
        });
    }
    // Fits in usize: voxels <= max_voxels and the allocation is checked later.
    let as_usize = |v: u64| {
        usize::try_from(v).map_err(|_| NiftiIoError::Alloc {
            path: path.to_path_buf(),
            bytes: data_bytes,
        })
    };
    let dims = [
        as_usize(sizes[0])?,
        as_usize(sizes[1])?,
        as_usize(sizes[2])?,
    ];
    let channels = as_usize(extra.first().copied().unwrap_or(1))?;
    as_usize(u64::try_from(voxels * 4).unwrap_or(u64::MAX))?;

    Ok(Layout {
        dims,
        channels,
        datatype,
        vox_offset,
        scaling: scaling_of(path, h),
    })
}

/// `scl_slope`/`scl_inter` as the standard defines them: slope 0 means the
/// values are stored unscaled. Like nibabel, a non-finite slope is treated
/// as "no scaling" and a non-finite intercept as 0, rather than turning the
/// whole image into NaN.
fn scaling_of(path: &Path, h: &NiftiHeader) -> Option<(f64, f64)> {
    let slope = f64::from(h.scl_slope);
    let mut inter = f64::from(h.scl_inter);
    if slope == 0.0 {
        return None;
    }
    if !slope.is_finite() {
        tracing::warn!(path = ?path, slope, "ignoring non-finite scl_slope");
        return None;
    }
    if !inter.is_finite() {
        tracing::warn!(path = ?path, inter, "ignoring non-finite scl_inter");
        inter = 0.0;
    }
    if slope == 1.0 && inter == 0.0 {
        None
    } else {
        Some((slope, inter))
    }
}

fn bytes_n<const N: usize>(chunk: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(chunk);
    a
}

/// Decode raw voxels to f32 (with scaling), returning how many are not finite.
fn decode(
    dt: DataType,
    big: bool,
    scaling: Option<(f64, f64)>,
    raw: &[u8],
    out: &mut [f32],
) -> u64 {
    macro_rules! run {
        ($t:ty, $n:expr) => {{
            let chunks = raw.chunks_exact($n);
            let read = |c: &[u8]| -> $t {
                let b = bytes_n::<$n>(c);
                if big {
                    <$t>::from_be_bytes(b)
                } else {
                    <$t>::from_le_bytes(b)
                }
            };
            match scaling {
                None => {
                    for (o, c) in out.iter_mut().zip(chunks) {
                        *o = read(c) as f32;
                    }
                }
                Some((slope, inter)) => {
                    for (o, c) in out.iter_mut().zip(chunks) {
                        *o = (read(c) as f64 * slope + inter) as f32;
                    }
                }
            }
        }};
    }
    match dt {
        DataType::U8 => run!(u8, 1),
        DataType::I8 => run!(i8, 1),
        DataType::I16 => run!(i16, 2),
        DataType::U16 => run!(u16, 2),
        DataType::I32 => run!(i32, 4),
        DataType::U32 => run!(u32, 4),
        DataType::I64 => run!(i64, 8),
        DataType::U64 => run!(u64, 8),
        DataType::F32 => run!(f32, 4),
        DataType::F64 => run!(f64, 8),
    }
    out.iter().filter(|v| !v.is_finite()).count() as u64
}

/// The voxel-to-world affine the NIfTI standard prescribes: sform when
/// `sform_code > 0`, else qform when `qform_code > 0`, else the ANALYZE
/// pixdim diagonal; converted to millimetres per `xyzt_units`. A degenerate
/// sform/qform falls through to the next method instead of producing a
/// singular affine.
fn header_affine(h: &NiftiHeader) -> (Matrix4<f64>, AffineSource) {
    let (affine, source) = if h.sform_code > 0 && affine_is_valid(&sform_matrix(h)) {
        (sform_matrix(h), AffineSource::Sform)
    } else if h.qform_code > 0 && affine_is_valid(&qform_matrix(h)) {
        (qform_matrix(h), AffineSource::Qform)
    } else {
        let mut a = Matrix4::identity();
        for i in 0..3 {
            let p = f64::from(h.pixdim[i + 1]);
            a[(i, i)] = if p.is_finite() && p > 0.0 { p } else { 1.0 };
        }
        (a, AffineSource::Pixdim)
    };
    // The world frame of this runtime is millimetres; target spacings in
    // model manifests would be meaningless against metres or microns.
    let to_mm = match h.xyzt_units & 0o7 {
        1 => 1000.0,
        3 => 0.001,
        _ => 1.0,
    };
    if to_mm != 1.0 {
        let mut scaled = affine;
        for r in 0..3 {
            for c in 0..4 {
                scaled[(r, c)] *= to_mm;
            }
        }
        (scaled, source)
    } else {
        (affine, source)
    }
}

fn sform_matrix(h: &NiftiHeader) -> Matrix4<f64> {
    let mut a = Matrix4::identity();
    for (r, row) in [h.srow_x, h.srow_y, h.srow_z].iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            a[(r, c)] = f64::from(*v);
        }
    }
    a
}

/// The qform affine exactly as nifti1_io's `quatern_to_mat44` computes it.
/// Written out here because the `nifti` crate's version panics on the
/// inputs an untrusted file can contain (negative pixdim, |bcd| > 1).
fn qform_matrix(h: &NiftiHeader) -> Matrix4<f64> {
    let (mut b, mut c, mut d) = (
        f64::from(h.quatern_b),
        f64::from(h.quatern_c),
        f64::from(h.quatern_d),
    );
    let mut a = 1.0 - (b * b + c * c + d * d);
    if a < 1e-7 {
        // Not a unit quaternion: normalise (b, c, d) and treat it as a
        // 180-degree rotation, as nifti1_io does.
        let n = 1.0 / (b * b + c * c + d * d).sqrt();
        b *= n;
        c *= n;
        d *= n;
        a = 0.0;
    } else {
        a = a.sqrt();
    }
    let pix = |i: usize| {
        let p = f64::from(h.pixdim[i]);
        if p > 0.0 { p } else { 1.0 }
    };
    let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
    let r = Matrix3::new(
        a * a + b * b - c * c - d * d,
        2.0 * (b * c - a * d),
        2.0 * (b * d + a * c),
        2.0 * (b * c + a * d),
        a * a + c * c - b * b - d * d,
        2.0 * (c * d - a * b),
        2.0 * (b * d - a * c),
        2.0 * (c * d + a * b),
        a * a + d * d - c * c - b * b,
    );
    let zoom = Matrix3::from_diagonal(&nalgebra::Vector3::new(pix(1), pix(2), qfac * pix(3)));
    let m = r * zoom;
    let mut out = Matrix4::identity();
    out.fixed_view_mut::<3, 3>(0, 0).copy_from(&m);
    out[(0, 3)] = f64::from(h.quatern_x);
    out[(1, 3)] = f64::from(h.quatern_y);
    out[(2, 3)] = f64::from(h.quatern_z);
    out
}

/// Finite, last row (0, 0, 0, 1) and a linear part that is not (nearly)
/// singular relative to its scale.
fn affine_is_valid(a: &Matrix4<f64>) -> bool {
    if a.iter().any(|v| !v.is_finite()) {
        return false;
    }
    if a[(3, 0)] != 0.0 || a[(3, 1)] != 0.0 || a[(3, 2)] != 0.0 || a[(3, 3)] != 1.0 {
        return false;
    }
    let lin = a.fixed_view::<3, 3>(0, 0);
    let norms: f64 = (0..3).map(|c| lin.column(c).norm()).product();
    norms > 0.0 && lin.determinant().abs() > 1e-6 * norms
}

// ---------------------------------------------------------------- writing

/// Write a label map (`[X, Y, Z]`, uint8) on `reference`'s grid, with the
/// reference header's sform/qform (codes and parameters), pixdim and units,
/// so it overlays the input exactly in any viewer.
pub fn write_labels(
    path: &Path,
    labels: ArrayView3<u8>,
    reference: &Volume,
) -> Result<(), NiftiIoError> {
    check_grid(path, "labels", labels.shape(), reference)?;
    let header = output_header(
        path,
        reference,
        Target {
            channels: 1,
            datatype: DataType::U8,
            descrip: Some("infl8 segmentation"),
            keep_all_fields: false,
            always_4d: false,
        },
    )?;
    let view = labels.insert_axis(Axis(0));
    write_atomic(path, &header, |w| {
        write_fortran(path, w, view, 1, |v: u8, buf| {
            buf.push(v);
            Ok(())
        })
    })
}

/// Write per-class scores `[K, X, Y, Z]` as a float32 4D image `[X, Y, Z, K]`
/// (channel last, the NIfTI convention) on `reference`'s grid; 4D even
/// when K is 1.
pub fn write_logits(
    path: &Path,
    logits: ArrayView4<f32>,
    reference: &Volume,
) -> Result<(), NiftiIoError> {
    check_grid(path, "logits", &logits.shape()[1..], reference)?;
    let channels = logits.shape()[0];
    if channels == 0 {
        return Err(NiftiIoError::InvalidWrite {
            path: path.to_path_buf(),
            detail: "logits have 0 channels".into(),
        });
    }
    let mut header = output_header(
        path,
        reference,
        Target {
            channels,
            datatype: DataType::F32,
            descrip: Some("infl8 logits"),
            keep_all_fields: false,
            always_4d: true,
        },
    )?;
    // The 4th axis holds classes, not time.
    header.pixdim[4] = 1.0;
    header.xyzt_units &= 0o7;
    write_atomic(path, &header, |w| {
        write_fortran(path, w, logits, 4, |v: f32, buf| {
            buf.extend_from_slice(&v.to_le_bytes());
            Ok(())
        })
    })
}

/// Write a volume's data converted to `datatype` (3D when it has one
/// channel, else 4D `[X, Y, Z, C]`). Integer types get the values rounded to
/// nearest; a value that is not finite or out of the type's range is an
/// error (and no file is left behind). All header fields of the volume's
/// header are kept when it still describes the volume's grid.
pub fn write_volume(path: &Path, vol: &Volume, datatype: DataType) -> Result<(), NiftiIoError> {
    let channels = vol.channels();
    if channels == 0 {
        return Err(NiftiIoError::InvalidWrite {
            path: path.to_path_buf(),
            detail: "volume has 0 channels".into(),
        });
    }
    let header = output_header(
        path,
        vol,
        Target {
            channels,
            datatype,
            descrip: None,
            keep_all_fields: true,
            always_4d: false,
        },
    )?;
    write_atomic(path, &header, |w| {
        write_fortran(path, w, vol.data.view(), datatype.size(), |v: f32, buf| {
            encode_value(datatype, v, buf)
        })
    })
}

/// Append `v` converted to `dt` (little-endian); `Err` names the bad value.
fn encode_value(dt: DataType, v: f32, buf: &mut Vec<u8>) -> Result<(), String> {
    macro_rules! int {
        ($t:ty) => {{
            let r = f64::from(v).round();
            if !r.is_finite() || r < <$t>::MIN as f64 || r > <$t>::MAX as f64 {
                return Err(format!(
                    "value {v} does not fit datatype {}",
                    stringify!($t)
                ));
            }
            buf.extend_from_slice(&(r as $t).to_le_bytes());
        }};
    }
    match dt {
        DataType::U8 => int!(u8),
        DataType::I8 => int!(i8),
        DataType::I16 => int!(i16),
        DataType::U16 => int!(u16),
        DataType::I32 => int!(i32),
        DataType::U32 => int!(u32),
        DataType::I64 => int!(i64),
        DataType::U64 => int!(u64),
        DataType::F32 => buf.extend_from_slice(&v.to_le_bytes()),
        DataType::F64 => buf.extend_from_slice(&f64::from(v).to_le_bytes()),
    }
    Ok(())
}

fn check_grid(
    path: &Path,
    what: &str,
    shape: &[usize],
    reference: &Volume,
) -> Result<(), NiftiIoError> {
    let dims = reference.dims();
    if shape != dims {
        return Err(NiftiIoError::InvalidWrite {
            path: path.to_path_buf(),
            detail: format!("{what} have shape {shape:?} but the reference grid is {dims:?}"),
        });
    }
    Ok(())
}

struct Target<'a> {
    channels: usize,
    datatype: DataType,
    descrip: Option<&'a str>,
    /// Keep every field of the reference header (data-prep round trips)
    /// instead of only its geometry (derived outputs).
    keep_all_fields: bool,
    /// Write a 4D header even for a single channel.
    always_4d: bool,
}

/// A header for an output on `reference`'s grid. The reference header's
/// geometry is copied verbatim when it still describes the reference's grid
/// (the normal case: the volume was read from that file); otherwise — no
/// header, or a header left over from a different grid — the geometry is
/// built from the affine, which is the truth the rest of the runtime uses.
fn output_header(
    path: &Path,
    reference: &Volume,
    target: Target<'_>,
) -> Result<NiftiHeader, NiftiIoError> {
    let invalid = |detail: String| NiftiIoError::InvalidWrite {
        path: path.to_path_buf(),
        detail,
    };
    let dims = reference.dims();
    if let Some(bad) = dims
        .iter()
        .chain(std::iter::once(&target.channels))
        .find(|&&d| d == 0 || d > MAX_DIM)
    {
        return Err(invalid(format!(
            "size {bad} in {dims:?} x {} channels cannot be stored in NIfTI-1 (1..=32767)",
            target.channels
        )));
    }
    // The header stores the affine as f32.
    let representable = reference.affine.iter().all(|v| v.abs() < 1e30);
    if !affine_is_valid(&reference.affine) || !representable {
        return Err(invalid(format!(
            "the reference affine is degenerate or not finite: {:?}",
            reference.affine
        )));
    }

    let usable = reference.header.as_ref().filter(|h| {
        let ok = header_matches_grid(h, dims, &reference.affine);
        if !ok {
            tracing::warn!(
                path = %path.display(),
                "the reference header does not describe the reference grid; \
                 writing geometry from the affine instead"
            );
        }
        ok
    });
    let mut h = match (usable, target.keep_all_fields) {
        (Some(src), true) => src.clone(),
        (Some(src), false) => {
            let mut h = NiftiHeader::default();
            copy_geometry(src, &mut h);
            h
        }
        (None, keep) => {
            let mut h = match (&reference.header, keep) {
                (Some(src), true) => src.clone(),
                _ => NiftiHeader::default(),
            };
            set_geometry_from_affine(&mut h, &reference.affine);
            h
        }
    };

    let rank: u16 = if target.channels > 1 || target.always_4d {
        4
    } else {
        3
    };
    h.dim = [
        rank,
        dims[0] as u16,
        dims[1] as u16,
        dims[2] as u16,
        if rank == 4 { target.channels as u16 } else { 1 },
        1,
        1,
        1,
    ];
    if rank == 4 && !(h.pixdim[4].is_finite() && h.pixdim[4] > 0.0) {
        h.pixdim[4] = 1.0;
    }
    h.sizeof_hdr = HEADER_SIZE as i32;
    h.datatype = target.datatype.code();
    h.bitpix = (target.datatype.size() * 8) as i16;
    h.vox_offset = OUT_VOX_OFFSET as f32;
    // The data we write is the final value: any scaling in the reference
    // (e.g. of a CT stored as int16) must not be applied to labels again.
    h.scl_slope = 1.0;
    h.scl_inter = 0.0;
    h.magic = *b"n+1\0";
    h.endianness = Endianness::Little;
    if let Some(d) = target.descrip {
        h.intent_code = 0;
        h.intent_name = [0; 16];
        h.cal_min = 0.0;
        h.cal_max = 0.0;
        h.set_description_str(d)
            .map_err(|e| invalid(format!("description: {e}")))?;
    }
    if h.descrip.len() != 80 {
        h.descrip.resize(80, 0);
    }
    Ok(h)
}

fn header_matches_grid(h: &NiftiHeader, dims: [usize; 3], affine: &Matrix4<f64>) -> bool {
    let rank = h.dim[0] as usize;
    let hdims: Vec<usize> = (1..=3)
        .map(|i| if i <= rank { h.dim[i] as usize } else { 1 })
        .collect();
    if hdims != dims {
        return false;
    }
    let (ha, _) = header_affine(h);
    let scale = affine.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    (ha - affine).iter().all(|d| d.abs() <= 1e-5 * scale)
}

fn copy_geometry(src: &NiftiHeader, dst: &mut NiftiHeader) {
    dst.pixdim = src.pixdim;
    dst.qform_code = src.qform_code;
    dst.sform_code = src.sform_code;
    dst.quatern_b = src.quatern_b;
    dst.quatern_c = src.quatern_c;
    dst.quatern_d = src.quatern_d;
    dst.quatern_x = src.quatern_x;
    dst.quatern_y = src.quatern_y;
    dst.quatern_z = src.quatern_z;
    dst.srow_x = src.srow_x;
    dst.srow_y = src.srow_y;
    dst.srow_z = src.srow_z;
    dst.xyzt_units = src.xyzt_units;
    dst.dim_info = src.dim_info;
}

/// sform from the affine (code "aligned"), and a qform too when the affine
/// is a rotation plus zooms (so qform-preferring tools agree); units mm.
fn set_geometry_from_affine(h: &mut NiftiHeader, affine: &Matrix4<f64>) {
    h.set_sform(affine, XForm::AlignedAnat);
    h.set_qform(affine, XForm::AlignedAnat);
    let q = qform_matrix(h);
    let scale = affine.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    if (q - affine).iter().any(|d| d.abs() > 1e-4 * scale) {
        h.qform_code = XForm::Unknown as i16;
    }
    h.xyzt_units = (h.xyzt_units & 0o70) | 2;
}

/// Encode a header little-endian, followed by the 4-byte "no extensions" flag.
fn encode_header(h: &NiftiHeader) -> Vec<u8> {
    let mut b = Vec::with_capacity(OUT_VOX_OFFSET);
    let i16s = |b: &mut Vec<u8>, v: i16| b.extend_from_slice(&v.to_le_bytes());
    let f32s = |b: &mut Vec<u8>, v: f32| b.extend_from_slice(&v.to_le_bytes());
    b.extend_from_slice(&h.sizeof_hdr.to_le_bytes());
    b.extend_from_slice(&h.data_type);
    b.extend_from_slice(&h.db_name);
    b.extend_from_slice(&h.extents.to_le_bytes());
    i16s(&mut b, h.session_error);
    b.push(h.regular);
    b.push(h.dim_info);
    for d in h.dim {
        b.extend_from_slice(&d.to_le_bytes());
    }
    f32s(&mut b, h.intent_p1);
    f32s(&mut b, h.intent_p2);
    f32s(&mut b, h.intent_p3);
    i16s(&mut b, h.intent_code);
    i16s(&mut b, h.datatype);
    i16s(&mut b, h.bitpix);
    i16s(&mut b, h.slice_start);
    for p in h.pixdim {
        f32s(&mut b, p);
    }
    f32s(&mut b, h.vox_offset);
    f32s(&mut b, h.scl_slope);
    f32s(&mut b, h.scl_inter);
    i16s(&mut b, h.slice_end);
    b.push(h.slice_code);
    b.push(h.xyzt_units);
    f32s(&mut b, h.cal_max);
    f32s(&mut b, h.cal_min);
    f32s(&mut b, h.slice_duration);
    f32s(&mut b, h.toffset);
    b.extend_from_slice(&h.glmax.to_le_bytes());
    b.extend_from_slice(&h.glmin.to_le_bytes());
    let mut descrip = [0u8; 80];
    let n = h.descrip.len().min(80);
    descrip[..n].copy_from_slice(&h.descrip[..n]);
    b.extend_from_slice(&descrip);
    b.extend_from_slice(&h.aux_file);
    i16s(&mut b, h.qform_code);
    i16s(&mut b, h.sform_code);
    for q in [
        h.quatern_b,
        h.quatern_c,
        h.quatern_d,
        h.quatern_x,
        h.quatern_y,
        h.quatern_z,
    ] {
        f32s(&mut b, q);
    }
    for v in h.srow_x.iter().chain(&h.srow_y).chain(&h.srow_z) {
        f32s(&mut b, *v);
    }
    b.extend_from_slice(&h.intent_name);
    b.extend_from_slice(&h.magic);
    debug_assert_eq!(b.len(), HEADER_SIZE);
    b.extend_from_slice(&[0u8; OUT_VOX_OFFSET - HEADER_SIZE]);
    b
}

/// Stream `[C, X, Y, Z]` data in NIfTI's Fortran order (x fastest, then y,
/// z, channel), a slab of z-slices at a time so no full-size copy is made.
fn write_fortran<T, F>(
    path: &Path,
    w: &mut dyn Write,
    data: ArrayView4<T>,
    elem_size: usize,
    mut encode: F,
) -> Result<(), NiftiIoError>
where
    T: Copy,
    F: FnMut(T, &mut Vec<u8>) -> Result<(), String>,
{
    let sh = data.shape();
    let (nc, nx, ny, nz) = (sh[0], sh[1], sh[2], sh[3]);
    let slice_len = nx * ny;
    if slice_len == 0 {
        return Ok(());
    }
    let slab_z = (SLAB_BYTES / (slice_len * elem_size.max(1))).clamp(1, nz.max(1));
    let mut vals: Vec<T> = Vec::with_capacity(slab_z * slice_len);
    let mut bytes = Vec::with_capacity(slab_z * slice_len * elem_size);
    for c in 0..nc {
        let mut z0 = 0;
        while z0 < nz {
            let dz = slab_z.min(nz - z0);
            let slab = data.slice(s![c, .., .., z0..z0 + dz]);
            // Blocked transpose [X, Y, dz] -> [dz, Y, X]: short contiguous
            // runs on both sides instead of one cache miss per voxel.
            vals.clear();
            vals.resize(dz * slice_len, slab[[0, 0, 0]]);
            for x0 in (0..nx).step_by(X_BLOCK) {
                let xb = X_BLOCK.min(nx - x0);
                for y in 0..ny {
                    for k in 0..dz {
                        let start = (k * ny + y) * nx + x0;
                        for (dx, v) in vals[start..start + xb].iter_mut().enumerate() {
                            *v = slab[[x0 + dx, y, k]];
                        }
                    }
                }
            }
            bytes.clear();
            for v in &vals {
                encode(*v, &mut bytes).map_err(|detail| NiftiIoError::InvalidWrite {
                    path: path.to_path_buf(),
                    detail,
                })?;
            }
            w.write_all(&bytes).map_err(io_err(path, "write"))?;
            z0 += dz;
        }
    }
    Ok(())
}

fn is_gz_path(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"))
}

/// Write header + body to `path` through [`fsio::write_with`] (atomic over
/// a regular file or nothing).
fn write_atomic<F>(path: &Path, header: &NiftiHeader, body: F) -> Result<(), NiftiIoError>
where
    F: FnOnce(&mut dyn Write) -> Result<(), NiftiIoError>,
{
    fsio::write_with(path, |file| {
        let header_bytes = encode_header(header);
        let mut buffered = BufWriter::with_capacity(1 << 20, file);
        if is_gz_path(path) {
            let mut enc = GzEncoder::new(buffered, Compression::fast());
            enc.write_all(&header_bytes)
                .map_err(io_err(path, "write"))?;
            body(&mut enc)?;
            buffered = enc.finish().map_err(io_err(path, "write"))?;
        } else {
            buffered
                .write_all(&header_bytes)
                .map_err(io_err(path, "write"))?;
            body(&mut buffered)?;
        }
        buffered.flush().map_err(io_err(path, "write"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array3, Array4};
    use std::fs;

    fn identity_volume(dims: [usize; 3], channels: usize) -> Volume {
        let data = Array4::from_shape_fn((channels, dims[0], dims[1], dims[2]), |(c, x, y, z)| {
            (c * 1000 + x * 100 + y * 10 + z) as f32
        });
        let mut affine = Matrix4::identity();
        affine[(0, 0)] = 0.8;
        affine[(1, 1)] = 0.9;
        affine[(2, 2)] = 2.5;
        affine[(0, 3)] = -10.0;
        affine[(1, 3)] = 20.0;
        affine[(2, 3)] = 5.0;
        Volume::new(data, affine)
    }

    #[test]
    fn header_encoding_round_trips_through_the_nifti_parser() {
        let vol = identity_volume([3, 4, 5], 1);
        let h = output_header(
            Path::new("x.nii"),
            &vol,
            Target {
                channels: 1,
                datatype: DataType::I16,
                descrip: Some("hello"),
                keep_all_fields: false,
                always_4d: false,
            },
        )
        .unwrap();
        let bytes = encode_header(&h);
        assert_eq!(bytes.len(), OUT_VOX_OFFSET);
        let parsed = NiftiHeader::from_reader(&bytes[..HEADER_SIZE]).unwrap();
        let mut expected = h.clone();
        expected.endianness = parsed.endianness;
        assert_eq!(parsed, expected);
    }

    #[test]
    fn qform_matches_the_nifti_crate_for_valid_quaternions() {
        let h = NiftiHeader {
            pixdim: [-1.0, 0.7, 1.3, 2.1, 1.0, 1.0, 1.0, 1.0],
            quatern_b: 0.1,
            quatern_c: -0.3,
            quatern_d: 0.2,
            quatern_x: 4.0,
            quatern_y: -7.5,
            quatern_z: 11.0,
            ..NiftiHeader::default()
        };
        let ours = qform_matrix(&h);
        let theirs: Matrix4<f64> = h.qform_affine();
        assert!((ours - theirs).abs().max() < 1e-6, "{ours} vs {theirs}");
    }

    #[test]
    fn qform_never_panics_on_hostile_quaternions() {
        let h = NiftiHeader {
            quatern_b: 3.0,
            quatern_c: f32::NAN,
            pixdim: [1.0, -2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            ..NiftiHeader::default()
        };
        let _ = qform_matrix(&h);
    }

    #[test]
    fn geometry_from_affine_reproduces_an_oblique_affine() {
        let (s, c) = 20f64.to_radians().sin_cos();
        #[rustfmt::skip]
        let affine = Matrix4::new(
            -0.8 * c, 0.0, 2.0 * s, 10.0,
            -0.8 * s, 0.0, -2.0 * c, -3.0,
            0.0, 1.1, 0.0, 40.0,
            0.0, 0.0, 0.0, 1.0,
        );
        let mut h = NiftiHeader::default();
        set_geometry_from_affine(&mut h, &affine);
        assert_eq!(h.sform_code, 2);
        assert_eq!(
            h.qform_code, 2,
            "a rigid+zoom affine is representable as a qform"
        );
        assert!((qform_matrix(&h) - affine).abs().max() < 1e-4);
        assert!((sform_matrix(&h) - affine).abs().max() < 1e-5);
    }

    #[test]
    fn sheared_affine_gets_no_qform() {
        let mut affine = Matrix4::identity();
        affine[(0, 1)] = 0.5;
        let mut h = NiftiHeader::default();
        set_geometry_from_affine(&mut h, &affine);
        assert_eq!(h.qform_code, 0);
        assert_eq!(h.sform_code, 2);
    }

    #[test]
    fn decode_handles_both_endiannesses_and_scaling() {
        let le: Vec<u8> = [-2i16, 300].iter().flat_map(|v| v.to_le_bytes()).collect();
        let be: Vec<u8> = [-2i16, 300].iter().flat_map(|v| v.to_be_bytes()).collect();
        let mut out = [0f32; 2];
        assert_eq!(decode(DataType::I16, false, None, &le, &mut out), 0);
        assert_eq!(out, [-2.0, 300.0]);
        decode(DataType::I16, true, Some((0.5, 10.0)), &be, &mut out);
        assert_eq!(out, [9.0, 160.0]);
        let nan: Vec<u8> = [f32::NAN, 1.0, f32::INFINITY]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut out = [0f32; 3];
        assert_eq!(decode(DataType::F32, false, None, &nan, &mut out), 2);
    }

    #[test]
    fn scaling_follows_the_standard() {
        let mut h = NiftiHeader::default();
        let p = Path::new("x.nii");
        h.scl_slope = 0.0;
        h.scl_inter = 5.0;
        assert_eq!(scaling_of(p, &h), None, "slope 0 means unscaled");
        h.scl_slope = 1.0;
        h.scl_inter = 0.0;
        assert_eq!(scaling_of(p, &h), None);
        h.scl_slope = 2.0;
        assert_eq!(scaling_of(p, &h), Some((2.0, 0.0)));
        h.scl_slope = f32::NAN;
        assert_eq!(scaling_of(p, &h), None);
    }

    #[test]
    fn labels_round_trip_and_meters_are_converted_to_mm() {
        let dir = tempfile::tempdir().unwrap();
        let vol = identity_volume([4, 3, 2], 1);
        let p = dir.path().join("vol.nii");
        write_volume(&p, &vol, DataType::F32).unwrap();
        let back = read_volume(&p, &ReadLimits::default()).unwrap();
        assert_eq!(back.data, vol.data);
        assert!((back.affine - vol.affine).abs().max() < 1e-5);

        let labels = Array3::from_shape_fn((4, 3, 2), |(x, y, z)| (x + y + z) as u8);
        let lp = dir.path().join("labels.nii.gz");
        write_labels(&lp, labels.view(), &back).unwrap();
        let read = read_volume(&lp, &ReadLimits::default()).unwrap();
        assert_eq!(read.data.index_axis(Axis(0), 0), labels.mapv(f32::from));
        let h = read.header.unwrap();
        assert_eq!(h.datatype, 2);
        assert_eq!(h.scl_slope, 1.0);
        assert_eq!(&h.descrip[..18], b"infl8 segmentation");

        // Same file declared in metres: the affine must come out in mm.
        let mut hm = back.header.clone().unwrap();
        hm.xyzt_units = 1;
        let metres = Volume {
            header: Some(hm.clone()),
            ..back.clone()
        };
        let (a, src) = header_affine(&hm);
        assert_eq!(src, AffineSource::Sform);
        assert!((a[(0, 0)] - 800.0).abs() < 1e-2);
        // A header that no longer matches the affine is not trusted.
        assert!(!header_matches_grid(&hm, metres.dims(), &metres.affine));
    }

    #[test]
    fn reading_from_bytes_matches_reading_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let vol = identity_volume([5, 4, 3], 2);
        for name in ["v.nii", "v.nii.gz"] {
            let p = dir.path().join(name);
            write_volume(&p, &vol, DataType::I16).unwrap();
            let bytes = fs::read(&p).unwrap();
            let from_file = read_volume(&p, &ReadLimits::default()).unwrap();
            let from_bytes =
                read_volume_bytes(Path::new(name), &bytes, &ReadLimits::default()).unwrap();
            assert_eq!(from_bytes.data, from_file.data);
            assert_eq!(from_bytes.affine, from_file.affine);
            assert_eq!(from_bytes.header, from_file.header);

            // Same checks, with the given name in the message.
            let err = read_volume_bytes(
                Path::new("upload.nii"),
                &bytes[..bytes.len() - 1],
                &ReadLimits::default(),
            )
            .unwrap_err();
            assert!(
                matches!(err, NiftiIoError::Truncated { .. }),
                "{name}: {err}"
            );
            assert!(err.to_string().contains("upload.nii"), "{err}");
        }
    }

    #[test]
    fn failed_write_leaves_no_temp_and_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut vol = identity_volume([3, 3, 3], 1);
        let p = dir.path().join("out.nii");
        write_volume(&p, &vol, DataType::F32).unwrap();
        let before = fs::read(&p).unwrap();
        // The bad value sits in the last slice: the failure happens mid-stream.
        vol.data[[0, 2, 2, 2]] = 300.0;
        let err = write_volume(&p, &vol, DataType::U8).unwrap_err();
        assert!(matches!(err, NiftiIoError::InvalidWrite { .. }), "{err}");
        assert!(err.to_string().contains("out.nii"), "{err}");
        assert_eq!(fs::read(&p).unwrap(), before);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    /// `vol` written as `.nii` into `dir`, with `edit` applied to its bytes.
    fn edited(dir: &Path, name: &str, vol: &Volume, edit: impl Fn(&mut Vec<u8>)) -> PathBuf {
        let p = dir.join(name);
        write_volume(&p, vol, DataType::F32).unwrap();
        let mut bytes = fs::read(&p).unwrap();
        edit(&mut bytes);
        fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn a_bad_dim0_is_reported_as_itself() {
        let dir = tempfile::tempdir().unwrap();
        let vol = identity_volume([4, 3, 2], 1);
        for (dim0, want) in [(8i16, "dim[0] = 8"), (0, "dim[0] = 0"), (-1, "dim[0] = -1")] {
            let p = edited(dir.path(), "d.nii", &vol, |b| {
                b[40..42].copy_from_slice(&dim0.to_le_bytes())
            });
            let e = read_volume(&p, &ReadLimits::default()).unwrap_err();
            let e = e.to_string();
            assert!(e.contains(want) && e.contains("d.nii"), "{e}");
            assert!(!e.contains("sizeof_hdr"), "{e}");
        }
        let p = edited(dir.path(), "s.nii", &vol, |b| {
            b[0..4].copy_from_slice(&349i32.to_le_bytes())
        });
        let e = read_volume(&p, &ReadLimits::default()).unwrap_err();
        assert!(e.to_string().contains("sizeof_hdr is 349"), "{e}");
    }

    #[test]
    fn micrometre_voxels_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut vol = identity_volume([4, 3, 2], 1);
        vol.affine = Matrix4::identity() * 1e-6;
        vol.affine[(3, 3)] = 1.0;
        vol.header = None;
        let p = dir.path().join("tiny.nii");
        write_volume(&p, &vol, DataType::F32).unwrap();
        let e = read_volume(&p, &ReadLimits::default()).unwrap_err();
        assert!(matches!(e, NiftiIoError::TinyVoxels { .. }), "{e}");
        let e = e.to_string();
        assert!(e.contains("tiny.nii") && e.contains("0.001 mm"), "{e}");
        // 10 um (micro-CT) still reads.
        vol.affine = Matrix4::identity() * 0.01;
        vol.affine[(3, 3)] = 1.0;
        write_volume(&p, &vol, DataType::F32).unwrap();
        read_volume(&p, &ReadLimits::default()).unwrap();
    }

    #[test]
    fn limit_errors_name_the_settings_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut vol = identity_volume([4, 3, 2], 1);
        let p = dir.path().join("v.nii");
        write_volume(&p, &vol, DataType::F32).unwrap();
        let tight = ReadLimits {
            max_voxels: 5,
            ..ReadLimits::default()
        };
        let e = read_volume(&p, &tight).unwrap_err().to_string();
        assert!(
            e.contains("(limits.max_voxels)") && !e.contains("ReadLimits"),
            "{e}"
        );
        let budget = ReadLimits {
            memory_budget_bytes: 95,
            ..ReadLimits::default()
        };
        let e = read_volume(&p, &budget).unwrap_err().to_string();
        assert!(e.contains("limits.memory_budget_mb"), "{e}");
        vol.data[[0, 1, 1, 1]] = f32::NAN;
        write_volume(&p, &vol, DataType::F32).unwrap();
        let e = read_volume(&p, &ReadLimits::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("limits.nonfinite = \"zero\"") && !e.contains("NonFinite::"),
            "{e}"
        );
    }

    #[test]
    fn a_gzip_stream_inflating_past_the_image_is_stopped_while_streaming() {
        let dir = tempfile::tempdir().unwrap();
        let vol = identity_volume([8, 8, 8], 1);
        let raw = dir.path().join("v.nii");
        write_volume(&raw, &vol, DataType::F32).unwrap();
        let image = fs::read(&raw).unwrap();
        // The image, then 64 MiB of zeros in the same member: a valid
        // stream of ~64 KiB that a reader without a cap inflates in full.
        let bomb = dir.path().join("bomb.nii.gz");
        let mut gz = GzEncoder::new(File::create(&bomb).unwrap(), Compression::fast());
        gz.write_all(&image).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            gz.write_all(&zeros).unwrap();
        }
        gz.finish().unwrap();
        assert!(fs::metadata(&bomb).unwrap().len() < 1 << 20);
        let e = read_volume(&bomb, &ReadLimits::default()).unwrap_err();
        assert!(e.to_string().contains("inflates to more than"), "{e}");
        // A cap above the voxel data: the stream is cut where it passes
        // the header plus the cap.
        let capped = ReadLimits {
            max_input_bytes: image.len() as u64 - 352 + 100,
            ..ReadLimits::default()
        };
        let e = read_volume(&bomb, &capped).unwrap_err().to_string();
        assert!(
            e.contains("bomb.nii.gz") && e.contains("limits.max_input_bytes"),
            "{e}"
        );
        // A little trailing data is still tolerated, as before.
        let fine = dir.path().join("fine.nii.gz");
        let mut gz = GzEncoder::new(File::create(&fine).unwrap(), Compression::fast());
        gz.write_all(&image).unwrap();
        gz.write_all(&[0u8; 16]).unwrap();
        gz.finish().unwrap();
        read_volume(&fine, &capped).unwrap();
    }

    #[test]
    fn max_input_bytes_checks_the_file_and_the_declared_data() {
        let dir = tempfile::tempdir().unwrap();
        let vol = identity_volume([8, 8, 8], 1);
        let raw = dir.path().join("raw.nii");
        write_volume(&raw, &vol, DataType::F32).unwrap();
        let file_len = fs::metadata(&raw).unwrap().len();
        let limits = |max| ReadLimits {
            max_input_bytes: max,
            ..ReadLimits::default()
        };
        // The file itself: refused from its size before anything is read.
        let err = read_volume(&raw, &limits(file_len - 1)).unwrap_err();
        assert!(
            matches!(
                err,
                NiftiIoError::InputBytes {
                    what: "the file",
                    ..
                }
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("raw.nii") && msg.contains("limits.max_input_bytes"),
            "{msg}"
        );
        read_volume(&raw, &limits(file_len)).unwrap();
        read_volume(&raw, &limits(0)).unwrap();

        // A gzip file far smaller than its voxels: the declared size decides.
        let gz = dir.path().join("zeros.nii.gz");
        let zeros = Volume {
            data: Array4::zeros((1, 32, 32, 32)),
            ..vol.clone()
        };
        write_volume(&gz, &zeros, DataType::F32).unwrap();
        let gz_len = fs::metadata(&gz).unwrap().len();
        let declared = 32 * 32 * 32 * 4;
        assert!(gz_len < declared / 4, "{gz_len}");
        let err = read_volume(&gz, &limits(declared - 1)).unwrap_err();
        match &err {
            NiftiIoError::InputBytes {
                what, bytes, max, ..
            } => {
                assert!(what.contains("header declares"), "{err}");
                assert_eq!(*bytes, u128::from(declared));
                assert_eq!(*max, declared - 1);
            }
            other => panic!("expected InputBytes, got {other}"),
        }
        read_volume(&gz, &limits(declared)).unwrap();
    }
}
