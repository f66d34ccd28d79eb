//! Writing label maps, logits and volumes on a reference grid: the output
//! header, the Fortran-order voxel body, and the atomic file write.

use std::io::{BufWriter, Write};
use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;
use ndarray::{ArrayView3, ArrayView4, Axis, s};
use nifti::{Endianness, NiftiHeader};

use super::affine::{
    affine_is_valid, copy_geometry, header_matches_grid, set_geometry_from_affine,
};
use super::{DataType, HEADER_SIZE, NiftiIoError, SLAB_BYTES, X_BLOCK, io_err};
use crate::fsio;
use crate::volume::Volume;

/// Where our writers put the voxels: header plus the 4-byte extension flag.
pub(super) const OUT_VOX_OFFSET: usize = 352;
/// NIfTI-1 stores sizes as signed 16-bit integers.
const MAX_DIM: usize = i16::MAX as usize;

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

pub(super) struct Target<'a> {
    pub(super) channels: usize,
    pub(super) datatype: DataType,
    pub(super) descrip: Option<&'a str>,
    /// Keep every field of the reference header (data-prep round trips)
    /// instead of only its geometry (derived outputs).
    pub(super) keep_all_fields: bool,
    /// Write a 4D header even for a single channel.
    pub(super) always_4d: bool,
}

/// A header for an output on `reference`'s grid. The reference header's
/// geometry is copied verbatim when it still describes the reference's grid
/// (the normal case: the volume was read from that file); otherwise — no
/// header, or a header left over from a different grid — the geometry is
/// built from the affine, which is the truth the rest of the runtime uses.
pub(super) fn output_header(
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

/// Encode a header little-endian, followed by the 4-byte "no extensions" flag.
pub(super) fn encode_header(h: &NiftiHeader) -> Vec<u8> {
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
