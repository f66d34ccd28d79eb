//! Reading: header parsing and validation against the caller's limits,
//! gzip streams held to their declared size, and voxel decoding straight
//! into [`Volume`]'s `[C, X, Y, Z]` layout.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::rc::Rc;

use flate2::bufread::GzDecoder;
use nifti::{Endianness, NiftiHeader};
use rayon::prelude::*;

use super::affine::{AffineSource, affine_is_valid, header_affine};
use super::{
    DataType, HEADER_SIZE, MIN_VOXEL_MM, NiftiIoError, NonFinite, ReadLimits, SLAB_BYTES, X_BLOCK,
    io_err,
};
use crate::volume::{Volume, spacing_of};

/// DEFLATE cannot expand data by more than ~1032:1, so a compressed file
/// smaller than `declared / GZ_MAX_RATIO` is certainly truncated. Checking
/// this up front stops a tiny hostile `.nii.gz` from making us allocate
/// gigabytes before its stream runs dry.
const GZ_MAX_RATIO: u64 = 1100;

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
pub(super) fn scaling_of(path: &Path, h: &NiftiHeader) -> Option<(f64, f64)> {
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
pub(super) fn decode(
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
