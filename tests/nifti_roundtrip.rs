//! NIfTI reading and writing against files built byte by byte here, so the
//! reader is checked against the format itself (both byte orders, every
//! datatype, hostile headers) and not only against our own writer.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;
use infl8_core::Volume;
use infl8_core::nifti_io::{
    DataType, NiftiIoError, NonFinite, ReadLimits, read_volume, write_labels, write_logits,
    write_volume,
};
use nalgebra::Matrix4;
use ndarray::{Array3, Array4, Axis};

/// A NIfTI-1 single file, written field by field at the offsets of the
/// standard (nifti1.h), in either byte order.
#[derive(Clone)]
struct RawNifti {
    /// dim[0..8]
    dim: [i16; 8],
    datatype: i16,
    bitpix: i16,
    pixdim: [f32; 8],
    vox_offset: f32,
    scl_slope: f32,
    scl_inter: f32,
    xyzt_units: u8,
    qform_code: i16,
    sform_code: i16,
    /// b, c, d, qoffset x, y, z
    quatern: [f32; 6],
    srow: [[f32; 4]; 3],
    magic: [u8; 4],
    big: bool,
    /// Raw voxel bytes, already in the file's byte order.
    data: Vec<u8>,
}

impl RawNifti {
    fn new(dims: &[i16], dt: DataType, big: bool) -> Self {
        let mut dim = [1i16; 8];
        dim[0] = dims.len() as i16;
        dim[1..=dims.len()].copy_from_slice(dims);
        RawNifti {
            dim,
            datatype: dt.code(),
            bitpix: (dt.size() * 8) as i16,
            pixdim: [1.0, 0.8, 0.9, 2.5, 1.0, 1.0, 1.0, 1.0],
            vox_offset: 352.0,
            scl_slope: 0.0,
            scl_inter: 0.0,
            xyzt_units: 2 | 8,
            qform_code: 0,
            sform_code: 1,
            quatern: [0.0; 6],
            srow: [
                [-0.8, 0.0, 0.0, 90.0],
                [0.0, 0.9, 0.0, -126.0],
                [0.0, 0.0, 2.5, -72.0],
            ],
            magic: *b"n+1\0",
            big,
            data: Vec::new(),
        }
    }

    fn header_bytes(&self) -> Vec<u8> {
        let mut h = vec![0u8; 348];
        let big = self.big;
        let put = |h: &mut Vec<u8>, off: usize, bytes: &[u8]| {
            h[off..off + bytes.len()].copy_from_slice(bytes)
        };
        let i32b = |v: i32| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let i16b = |v: i16| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let f32b = |v: f32| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        put(&mut h, 0, &i32b(348));
        for (i, d) in self.dim.iter().enumerate() {
            put(&mut h, 40 + 2 * i, &i16b(*d));
        }
        put(&mut h, 70, &i16b(self.datatype));
        put(&mut h, 72, &i16b(self.bitpix));
        for (i, p) in self.pixdim.iter().enumerate() {
            put(&mut h, 76 + 4 * i, &f32b(*p));
        }
        put(&mut h, 108, &f32b(self.vox_offset));
        put(&mut h, 112, &f32b(self.scl_slope));
        put(&mut h, 116, &f32b(self.scl_inter));
        h[123] = self.xyzt_units;
        put(&mut h, 148, b"hand-written test file");
        put(&mut h, 252, &i16b(self.qform_code));
        put(&mut h, 254, &i16b(self.sform_code));
        for (i, q) in self.quatern.iter().enumerate() {
            put(&mut h, 256 + 4 * i, &f32b(*q));
        }
        for (r, row) in self.srow.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                put(&mut h, 280 + 16 * r + 4 * c, &f32b(*v));
            }
        }
        put(&mut h, 344, &self.magic);
        h
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = self.header_bytes();
        out.resize(self.vox_offset.max(348.0) as usize, 0);
        out.extend_from_slice(&self.data);
        out
    }

    fn write(&self, path: &Path) {
        write_file(path, &self.bytes());
    }
}

fn write_file(path: &Path, bytes: &[u8]) {
    if path.extension().is_some_and(|e| e == "gz") {
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(bytes).unwrap();
        fs::write(path, enc.finish().unwrap()).unwrap();
    } else {
        fs::write(path, bytes).unwrap();
    }
}

/// A value for voxel (x, y, z, c) that exercises the range and sign of `dt`
/// and is exactly representable in f32.
fn sample(dt: DataType, x: usize, y: usize, z: usize, c: usize) -> f64 {
    let k = (x + 3 * y + 7 * z + 11 * c) as f64;
    match dt {
        DataType::U8 => (k * 5.0) % 256.0,
        DataType::I8 => (k * 5.0) % 256.0 - 128.0,
        DataType::I16 => k * 250.0 - 30000.0,
        DataType::U16 => k * 500.0 + 1000.0,
        DataType::I32 => (k - 40.0) * 16_777_216.0,
        DataType::U32 => k * 33_554_432.0,
        DataType::I64 => (k - 40.0) * 4_294_967_296.0,
        DataType::U64 => k * 8_589_934_592.0,
        DataType::F32 => (k - 20.0) * 0.125,
        DataType::F64 => (k - 20.0) * 1e-3,
    }
}

fn encode(dt: DataType, v: f64, big: bool) -> Vec<u8> {
    macro_rules! e {
        ($t:ty) => {{
            let x = v as $t;
            if big {
                x.to_be_bytes().to_vec()
            } else {
                x.to_le_bytes().to_vec()
            }
        }};
    }
    match dt {
        DataType::U8 => e!(u8),
        DataType::I8 => e!(i8),
        DataType::I16 => e!(i16),
        DataType::U16 => e!(u16),
        DataType::I32 => e!(i32),
        DataType::U32 => e!(u32),
        DataType::I64 => e!(i64),
        DataType::U64 => e!(u64),
        DataType::F32 => e!(f32),
        DataType::F64 => e!(f64),
    }
}

/// Voxel bytes in NIfTI order (x fastest, then y, z, channel).
fn fortran_data(dt: DataType, dims: [usize; 3], channels: usize, big: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for c in 0..channels {
        for z in 0..dims[2] {
            for y in 0..dims[1] {
                for x in 0..dims[0] {
                    out.extend(encode(dt, sample(dt, x, y, z, c), big));
                }
            }
        }
    }
    out
}

fn expected(dt: DataType, dims: [usize; 3], channels: usize) -> Array4<f32> {
    Array4::from_shape_fn((channels, dims[0], dims[1], dims[2]), |(c, x, y, z)| {
        sample(dt, x, y, z, c) as f32
    })
}

fn sform_of(raw: &RawNifti) -> Matrix4<f64> {
    let mut a = Matrix4::identity();
    for r in 0..3 {
        for c in 0..4 {
            a[(r, c)] = f64::from(raw.srow[r][c]);
        }
    }
    a
}

fn max_abs_diff(a: &Matrix4<f64>, b: &Matrix4<f64>) -> f64 {
    (a - b).abs().max()
}

fn limits() -> ReadLimits {
    ReadLimits::default()
}

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn every_datatype_in_both_byte_orders() {
    let d = dir();
    let dims = [3usize, 4, 5];
    for dt in DataType::ALL {
        for big in [false, true] {
            for gz in [false, true] {
                let mut raw = RawNifti::new(&[3, 4, 5], dt, big);
                raw.data = fortran_data(dt, dims, 1, big);
                let name = format!("{dt:?}-{big}.nii{}", if gz { ".gz" } else { "" });
                let p = d.path().join(name);
                raw.write(&p);
                let vol = read_volume(&p, &limits())
                    .unwrap_or_else(|e| panic!("{dt:?} big={big} gz={gz}: {e}"));
                assert_eq!(vol.data, expected(dt, dims, 1), "{dt:?} big={big} gz={gz}");
                assert!(vol.data.is_standard_layout());
                assert_eq!(vol.affine, sform_of(&raw));
                let h = vol.header.as_ref().unwrap();
                assert_eq!(h.datatype, dt.code());
                assert_eq!(
                    h.endianness,
                    if big {
                        nifti::Endianness::Big
                    } else {
                        nifti::Endianness::Little
                    }
                );
            }
        }
    }
}

#[test]
fn our_writer_round_trips_every_datatype() {
    let d = dir();
    for dt in DataType::ALL {
        let data = expected(dt, [4, 3, 2], 2);
        let mut affine = Matrix4::identity();
        affine[(0, 0)] = -1.25;
        affine[(1, 3)] = 17.0;
        let vol = Volume::new(data.clone(), affine);
        for ext in ["nii", "nii.gz"] {
            let p = d.path().join(format!("{dt:?}.{ext}"));
            write_volume(&p, &vol, dt).unwrap();
            let back = read_volume(&p, &limits()).unwrap();
            assert_eq!(back.data, data, "{dt:?} {ext}");
            assert!(max_abs_diff(&back.affine, &affine) < 1e-6);
            let h = back.header.unwrap();
            assert_eq!((h.dim[0], h.dim[4]), (4, 2));
            assert_eq!(h.datatype, dt.code());
            assert_eq!(h.bitpix as usize, dt.size() * 8);
        }
    }
}

#[test]
fn scl_slope_and_inter_are_applied_once() {
    let d = dir();
    let dims = [3usize, 4, 5];
    let mut raw = RawNifti::new(&[3, 4, 5], DataType::I16, true);
    raw.data = fortran_data(DataType::I16, dims, 1, true);
    raw.scl_slope = 0.5;
    raw.scl_inter = -1024.0;
    let p = d.path().join("scaled.nii");
    raw.write(&p);
    let vol = read_volume(&p, &limits()).unwrap();
    assert_eq!(
        vol.data,
        expected(DataType::I16, dims, 1).mapv(|v| v * 0.5 - 1024.0)
    );

    // Slope 0 means "not scaled" per the standard, whatever the intercept.
    raw.scl_slope = 0.0;
    raw.scl_inter = 99.0;
    raw.write(&p);
    let vol = read_volume(&p, &limits()).unwrap();
    assert_eq!(vol.data, expected(DataType::I16, dims, 1));

    // Float data is scaled too.
    let mut raw = RawNifti::new(&[3, 4, 5], DataType::F32, false);
    raw.data = fortran_data(DataType::F32, dims, 1, false);
    raw.scl_slope = 2.0;
    raw.write(&p);
    let vol = read_volume(&p, &limits()).unwrap();
    assert_eq!(vol.data, expected(DataType::F32, dims, 1).mapv(|v| v * 2.0));
}

/// A 90-degree rotation about z (quaternion d = sin 45) with qfac -1.
fn qform_raw(big: bool) -> RawNifti {
    let mut raw = RawNifti::new(&[3, 4, 5], DataType::U8, big);
    raw.data = fortran_data(DataType::U8, [3, 4, 5], 1, big);
    raw.sform_code = 0;
    raw.qform_code = 1;
    let h = std::f32::consts::FRAC_1_SQRT_2;
    raw.quatern = [0.0, 0.0, h, 10.0, -20.0, 30.0];
    raw.pixdim[0] = -1.0;
    raw
}

fn qform_expected() -> Matrix4<f64> {
    // R = rotation by 90 degrees about z; columns scaled by (0.8, 0.9, -2.5).
    #[rustfmt::skip]
    let m = Matrix4::new(
        0.0, -0.9, 0.0, 10.0,
        0.8, 0.0, 0.0, -20.0,
        0.0, 0.0, -2.5, 30.0,
        0.0, 0.0, 0.0, 1.0,
    );
    m
}

#[test]
fn qform_only_file() {
    let d = dir();
    for big in [false, true] {
        let p = d.path().join("qform.nii");
        qform_raw(big).write(&p);
        let vol = read_volume(&p, &limits()).unwrap();
        assert!(
            max_abs_diff(&vol.affine, &qform_expected()) < 1e-6,
            "{}",
            vol.affine
        );
        assert!((vol.spacing[0] - 0.8).abs() < 1e-6);
        assert!((vol.spacing[2] - 2.5).abs() < 1e-6);
    }
}

#[test]
fn sform_wins_over_qform_and_pixdim_is_the_last_resort() {
    let d = dir();
    let p = d.path().join("both.nii");
    let mut raw = qform_raw(false);
    raw.sform_code = 2;
    raw.write(&p);
    let vol = read_volume(&p, &limits()).unwrap();
    assert_eq!(vol.affine, sform_of(&raw));

    // A degenerate sform (all zeros) falls back to the qform.
    raw.srow = [[0.0; 4]; 3];
    raw.write(&p);
    let vol = read_volume(&p, &limits()).unwrap();
    assert!(max_abs_diff(&vol.affine, &qform_expected()) < 1e-6);

    raw.sform_code = 0;
    raw.qform_code = 0;
    raw.write(&p);
    let vol = read_volume(&p, &limits()).unwrap();
    let mut diag = Matrix4::identity();
    diag[(0, 0)] = f64::from(0.8f32);
    diag[(1, 1)] = f64::from(0.9f32);
    diag[(2, 2)] = 2.5;
    assert_eq!(vol.affine, diag);
}

#[test]
fn labels_written_on_the_reference_grid_read_back_identically() {
    let d = dir();
    // A big-endian, scaled, int16 reference with both sform and qform.
    let mut raw = qform_raw(true);
    raw.datatype = DataType::I16.code();
    raw.bitpix = 16;
    raw.data = fortran_data(DataType::I16, [3, 4, 5], 1, true);
    raw.sform_code = 4;
    raw.qform_code = 1;
    raw.scl_slope = 3.0;
    raw.scl_inter = 7.0;
    raw.xyzt_units = 2 | 16;
    let src = d.path().join("ct.nii.gz");
    raw.write(&src);
    let reference = read_volume(&src, &limits()).unwrap();

    let labels = Array3::from_shape_fn((3, 4, 5), |(x, y, z)| ((x * 31 + y * 7 + z) % 4) as u8);
    for name in ["seg.nii", "seg.nii.gz"] {
        let out = d.path().join(name);
        write_labels(&out, labels.view(), &reference).unwrap();
        let back = read_volume(&out, &limits()).unwrap();
        assert_eq!(back.data.index_axis(Axis(0), 0), labels.mapv(f32::from));
        assert_eq!(back.affine, reference.affine);

        let r = reference.header.as_ref().unwrap();
        let h = back.header.as_ref().unwrap();
        assert_eq!(h.dim, [3, 3, 4, 5, 1, 1, 1, 1]);
        assert_eq!((h.datatype, h.bitpix), (2, 8));
        assert_eq!((h.scl_slope, h.scl_inter), (1.0, 0.0));
        assert_eq!((h.sform_code, h.qform_code), (4, 1));
        assert_eq!(
            (h.srow_x, h.srow_y, h.srow_z),
            (r.srow_x, r.srow_y, r.srow_z)
        );
        assert_eq!(
            [
                h.quatern_b,
                h.quatern_c,
                h.quatern_d,
                h.quatern_x,
                h.quatern_y,
                h.quatern_z
            ],
            [
                r.quatern_b,
                r.quatern_c,
                r.quatern_d,
                r.quatern_x,
                r.quatern_y,
                r.quatern_z
            ]
        );
        assert_eq!(h.pixdim, r.pixdim);
        assert_eq!(h.xyzt_units, r.xyzt_units);
        assert_eq!(&h.descrip[..19], b"infl8 segmentation\0");
        // The qform alone must describe the same grid too.
        let mut qonly = h.clone();
        qonly.sform_code = 0;
        let q: Matrix4<f64> = qonly.affine();
        assert!(max_abs_diff(&q, &qform_expected()) < 1e-6);
    }
    assert_eq!(entries(d.path()).len(), 3, "no stray temporary files");
}

#[test]
fn labels_without_a_reference_header_use_the_affine() {
    let d = dir();
    let (s, c) = 20f64.to_radians().sin_cos();
    #[rustfmt::skip]
    let affine = Matrix4::new(
        0.7 * c, -0.7 * s, 0.0, 5.0,
        0.7 * s, 0.7 * c, 0.0, 6.0,
        0.0, 0.0, -3.0, 7.0,
        0.0, 0.0, 0.0, 1.0,
    );
    let reference = Volume::new(Array4::zeros((1, 2, 3, 4)), affine);
    let labels = Array3::from_shape_fn((2, 3, 4), |(x, y, z)| (x + y + z) as u8);
    let p = d.path().join("seg.nii.gz");
    write_labels(&p, labels.view(), &reference).unwrap();
    let back = read_volume(&p, &limits()).unwrap();
    assert!(max_abs_diff(&back.affine, &affine) < 1e-5);
    let h = back.header.unwrap();
    assert!(h.sform_code > 0 && h.qform_code > 0);
    let mut qonly = h.clone();
    qonly.sform_code = 0;
    let q: Matrix4<f64> = qonly.affine();
    assert!(max_abs_diff(&q, &affine) < 1e-5);
}

#[test]
fn four_and_five_dimensional_files() {
    let d = dir();
    let dims = [3usize, 4, 5];
    let p = d.path().join("x.nii");

    // 4D with a single volume is 3D.
    let mut raw = RawNifti::new(&[3, 4, 5, 1], DataType::F32, false);
    raw.data = fortran_data(DataType::F32, dims, 1, false);
    raw.write(&p);
    let vol = read_volume(&p, &limits()).unwrap();
    assert_eq!(vol.data, expected(DataType::F32, dims, 1));

    // 4D with 3 volumes: channels.
    let mut raw = RawNifti::new(&[3, 4, 5, 3], DataType::I16, true);
    raw.data = fortran_data(DataType::I16, dims, 3, true);
    raw.write(&p);
    let vol = read_volume(&p, &limits()).unwrap();
    assert_eq!(vol.data, expected(DataType::I16, dims, 3));

    // 5D with dim4 == 1 and dim5 == 2 (NIfTI vector images): channels.
    let mut raw = RawNifti::new(&[3, 4, 5, 1, 2], DataType::F64, false);
    raw.data = fortran_data(DataType::F64, dims, 2, false);
    raw.write(&p);
    let vol = read_volume(&p, &limits()).unwrap();
    assert_eq!(vol.data, expected(DataType::F64, dims, 2));

    // A 2D image is a single slice.
    let mut raw = RawNifti::new(&[3, 4], DataType::U8, false);
    raw.pixdim[3] = 0.0;
    raw.data = fortran_data(DataType::U8, [3, 4, 1], 1, false);
    raw.write(&p);
    let vol = read_volume(&p, &limits()).unwrap();
    assert_eq!(vol.data, expected(DataType::U8, [3, 4, 1], 1));

    // A time series of vector images is refused.
    let mut raw = RawNifti::new(&[3, 4, 5, 2, 2], DataType::U8, false);
    raw.data = fortran_data(DataType::U8, dims, 4, false);
    raw.write(&p);
    let err = read_volume(&p, &limits()).unwrap_err();
    assert!(matches!(err, NiftiIoError::Unsupported { .. }), "{err}");
}

#[test]
fn logits_are_written_channel_last() {
    let d = dir();
    let mut raw = RawNifti::new(&[3, 4, 5], DataType::U8, false);
    raw.data = fortran_data(DataType::U8, [3, 4, 5], 1, false);
    let src = d.path().join("in.nii");
    raw.write(&src);
    let reference = read_volume(&src, &limits()).unwrap();
    let logits = Array4::from_shape_fn((2, 3, 4, 5), |(k, x, y, z)| {
        k as f32 * 0.5 - (x * 20 + y * 5 + z) as f32 * 0.01
    });
    let p = d.path().join("logits.nii.gz");
    write_logits(&p, logits.view(), &reference).unwrap();
    let back = read_volume(&p, &limits()).unwrap();
    assert_eq!(back.data, logits);
    assert_eq!(back.affine, reference.affine);
    let h = back.header.unwrap();
    assert_eq!(h.dim[..5], [4, 3, 4, 5, 2]);
    assert_eq!(h.datatype, 16);

    // A single class is still written as 4D.
    write_logits(&p, logits.slice(ndarray::s![..1, .., .., ..]), &reference).unwrap();
    let back = read_volume(&p, &limits()).unwrap();
    assert_eq!(back.header.unwrap().dim[..5], [4, 3, 4, 5, 1]);
    assert_eq!(back.data, logits.slice(ndarray::s![..1, .., .., ..]));

    let wrong = Array4::<f32>::zeros((2, 3, 4, 6));
    assert!(write_logits(&p, wrong.view(), &reference).is_err());
}

#[test]
fn extensions_before_vox_offset_are_skipped() {
    let d = dir();
    let mut raw = RawNifti::new(&[3, 4, 5], DataType::U16, true);
    raw.data = fortran_data(DataType::U16, [3, 4, 5], 1, true);
    raw.vox_offset = 432.0;
    let p = d.path().join("ext.nii.gz");
    raw.write(&p);
    let vol = read_volume(&p, &limits()).unwrap();
    assert_eq!(vol.data, expected(DataType::U16, [3, 4, 5], 1));
}

#[test]
fn gzip_is_detected_from_the_content_not_the_name() {
    let d = dir();
    let mut raw = RawNifti::new(&[3, 4, 5], DataType::I8, false);
    raw.data = fortran_data(DataType::I8, [3, 4, 5], 1, false);
    let gz = d.path().join("really-gz.nii.gz");
    raw.write(&gz);
    let misnamed = d.path().join("misnamed.nii");
    fs::copy(&gz, &misnamed).unwrap();
    let vol = read_volume(&misnamed, &limits()).unwrap();
    assert_eq!(vol.data, expected(DataType::I8, [3, 4, 5], 1));
    // And an uncompressed file named .gz reads too.
    let plain = d.path().join("plain.nii.gz");
    fs::write(&plain, raw.bytes()).unwrap();
    assert!(read_volume(&plain, &limits()).is_ok());
}

fn assert_err<F: Fn(&NiftiIoError) -> bool>(p: &Path, check: F, needle: &str) {
    let err = read_volume(p, &limits()).expect_err("must fail");
    let msg = err.to_string();
    assert!(check(&err), "unexpected error kind: {msg}");
    assert!(msg.contains(&p.display().to_string()), "{msg}");
    assert!(msg.contains(needle), "{msg} lacks {needle:?}");
}

#[test]
fn truncated_files_are_refused() {
    let d = dir();
    let mut raw = RawNifti::new(&[10, 10, 10], DataType::F32, false);
    raw.data = fortran_data(DataType::F32, [10, 10, 10], 1, false);
    let full = raw.bytes();
    let is_trunc = |e: &NiftiIoError| matches!(e, NiftiIoError::Truncated { .. });

    let p = d.path().join("cut.nii");
    fs::write(&p, &full[..full.len() - 1]).unwrap();
    assert_err(&p, is_trunc, "4352");
    fs::write(&p, &full[..200]).unwrap();
    assert_err(&p, is_trunc, "header");

    // A gzip stream cut short, at several places.
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(&full).unwrap();
    let gz = enc.finish().unwrap();
    let p = d.path().join("cut.nii.gz");
    for keep in [gz.len() - 4, gz.len() / 2, 30] {
        fs::write(&p, &gz[..keep]).unwrap();
        let err = read_volume(&p, &limits()).expect_err("must fail");
        assert!(
            matches!(
                err,
                NiftiIoError::Truncated { .. } | NiftiIoError::CorruptGzip { .. }
            ),
            "{keep}: {err}"
        );
        assert!(err.to_string().contains("cut.nii.gz"), "{err}");
    }
    fs::write(&p, &gz[..gz.len() / 2]).unwrap();
    assert_err(&p, is_trunc, "truncated");
}

#[test]
fn multi_member_and_zero_padded_gzip_read() {
    let d = dir();
    let mut raw = RawNifti::new(&[6, 5, 4], DataType::I16, true);
    raw.data = fortran_data(DataType::I16, [6, 5, 4], 1, true);
    let bytes = raw.bytes();
    let gz = |b: &[u8]| {
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(b).unwrap();
        enc.finish().unwrap()
    };
    // Two members (bgzip, `cat a.gz b.gz`), split inside the header.
    let mut multi = gz(&bytes[..200]);
    multi.extend(gz(&bytes[200..]));
    let p = d.path().join("multi.nii.gz");
    fs::write(&p, &multi).unwrap();
    let vol = read_volume(&p, &limits()).unwrap();
    assert_eq!(vol.data, expected(DataType::I16, [6, 5, 4], 1));

    // Zero padding after the stream, as Python's gzip (nibabel) accepts.
    let mut padded = gz(&bytes);
    padded.extend([0u8; 512]);
    fs::write(&p, &padded).unwrap();
    let vol = read_volume(&p, &limits()).unwrap();
    assert_eq!(vol.data, expected(DataType::I16, [6, 5, 4], 1));

    // Junk after the stream is not padding.
    padded.extend(b"junk");
    fs::write(&p, &padded).unwrap();
    assert!(read_volume(&p, &limits()).is_err());
}

#[test]
fn corrupt_gzip_is_refused() {
    let d = dir();
    let mut raw = RawNifti::new(&[16, 16, 16], DataType::I16, false);
    raw.data = fortran_data(DataType::I16, [16, 16, 16], 1, false);
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(&raw.bytes()).unwrap();
    let gz = enc.finish().unwrap();
    let p = d.path().join("bad.nii.gz");

    // Corrupted CRC trailer: only the checksum can catch this.
    let mut bad = gz.clone();
    let n = bad.len();
    bad[n - 8] ^= 0xff;
    fs::write(&p, &bad).unwrap();
    assert_err(
        &p,
        |e| matches!(e, NiftiIoError::CorruptGzip { .. }),
        "gzip",
    );

    // Garbage in the middle of the deflate stream.
    let mut bad = gz.clone();
    for b in &mut bad[n / 2..n / 2 + 16] {
        *b ^= 0x5a;
    }
    fs::write(&p, &bad).unwrap();
    let err = read_volume(&p, &limits()).expect_err("must fail");
    assert!(
        matches!(
            err,
            NiftiIoError::CorruptGzip { .. } | NiftiIoError::Truncated { .. }
        ),
        "{err}"
    );
}

#[test]
fn huge_dims_fail_before_allocating() {
    let d = dir();
    let p = d.path().join("huge.nii");
    // 32767^7 voxels overflows 64 bits; the file is only a header.
    let raw = RawNifti::new(&[32767; 7], DataType::F64, false);
    raw.write(&p);
    assert_err(
        &p,
        |e| matches!(e, NiftiIoError::TooLarge { .. }),
        "max_voxels",
    );

    // 30000^3 fits in 64 bits but not in the limit.
    let raw = RawNifti::new(&[30000, 30000, 30000], DataType::U8, false);
    raw.write(&p);
    assert_err(
        &p,
        |e| matches!(e, NiftiIoError::TooLarge { .. }),
        "27000000000000",
    );

    // Within the limit but far bigger than the file (raw and gzip).
    let raw = RawNifti::new(&[512, 512, 512], DataType::F32, false);
    raw.write(&p);
    assert_err(
        &p,
        |e| matches!(e, NiftiIoError::Truncated { .. }),
        "536871264",
    );
    let pgz = d.path().join("huge.nii.gz");
    raw.write(&pgz);
    assert_err(
        &pgz,
        |e| matches!(e, NiftiIoError::Truncated { .. }),
        "DEFLATE",
    );

    // A tighter caller limit applies.
    let mut raw = RawNifti::new(&[10, 10, 10], DataType::U8, false);
    raw.data = vec![0; 1000];
    raw.write(&p);
    let err = read_volume(
        &p,
        &ReadLimits {
            max_voxels: 999,
            ..ReadLimits::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, NiftiIoError::TooLarge { .. }), "{err}");
}

#[test]
fn bad_headers_are_refused_with_the_field_named() {
    let d = dir();
    let p = d.path().join("bad.nii");
    let good = || {
        let mut raw = RawNifti::new(&[3, 4, 5], DataType::F32, false);
        raw.data = fortran_data(DataType::F32, [3, 4, 5], 1, false);
        raw
    };
    let is_header = |e: &NiftiIoError| matches!(e, NiftiIoError::Header { .. });

    for bad in [0.0f32, -0.9, f32::NAN, f32::INFINITY] {
        let mut raw = good();
        raw.pixdim[3] = bad;
        raw.write(&p);
        assert_err(&p, is_header, &format!("pixdim[3] = {bad}"));
    }
    for i in [2usize, 1] {
        let mut raw = good();
        raw.pixdim[i] = -0.9;
        raw.write(&p);
        assert_err(&p, is_header, &format!("pixdim[{i}] = -0.9"));
    }

    let mut raw = good();
    raw.dim[2] = -4;
    raw.write(&p);
    assert_err(&p, is_header, "dim[2] = -4");

    let mut raw = good();
    raw.dim[3] = 0;
    raw.write(&p);
    assert_err(&p, is_header, "dim[3] = 0");

    let mut raw = good();
    raw.dim[0] = 0;
    raw.write(&p);
    assert_err(&p, is_header, "dim[0] = 0");

    let mut raw = good();
    raw.datatype = 32;
    raw.write(&p);
    assert_err(
        &p,
        |e| matches!(e, NiftiIoError::Unsupported { .. }),
        "complex64",
    );

    let mut raw = good();
    raw.magic = *b"ni1\0";
    raw.write(&p);
    assert_err(
        &p,
        |e| matches!(e, NiftiIoError::Unsupported { .. }),
        ".hdr/.img",
    );

    let mut raw = good();
    raw.magic = *b"xyz\0";
    raw.write(&p);
    assert_err(&p, is_header, "magic");

    let mut raw = good();
    raw.vox_offset = 100.0;
    raw.write(&p);
    assert_err(&p, is_header, "vox_offset");

    fs::write(&p, b"not a nifti file at all").unwrap();
    assert_err(
        &p,
        |e| matches!(e, NiftiIoError::Truncated { .. }),
        "header",
    );

    let missing = d.path().join("missing.nii");
    let err = read_volume(&missing, &limits()).unwrap_err();
    assert!(matches!(err, NiftiIoError::Io { .. }), "{err}");
    assert!(err.to_string().contains("missing.nii"), "{err}");
}

#[test]
fn non_finite_voxels_follow_the_policy() {
    let d = dir();
    let p = d.path().join("nan.nii.gz");
    let mut raw = RawNifti::new(&[3, 4, 5], DataType::F32, true);
    let mut values = expected(DataType::F32, [3, 4, 5], 1);
    values[[0, 1, 2, 3]] = f32::NAN;
    values[[0, 2, 0, 0]] = f32::INFINITY;
    values[[0, 0, 3, 4]] = f32::NEG_INFINITY;
    for z in 0..5 {
        for y in 0..4 {
            for x in 0..3 {
                raw.data.extend(values[[0, x, y, z]].to_be_bytes());
            }
        }
    }
    raw.write(&p);
    assert_err(
        &p,
        |e| matches!(e, NiftiIoError::NonFinite { count: 3, .. }),
        "3 of 60",
    );

    let vol = read_volume(
        &p,
        &ReadLimits {
            allow_nonfinite: NonFinite::Zero,
            ..ReadLimits::default()
        },
    )
    .unwrap();
    let mut want = values.clone();
    want.mapv_inplace(|v| if v.is_finite() { v } else { 0.0 });
    assert_eq!(vol.data, want);
}

#[test]
fn failed_writes_leave_nothing_behind() {
    let d = dir();
    let reference = Volume::new(Array4::zeros((1, 3, 4, 5)), Matrix4::identity());
    let out = d.path().join("seg.nii.gz");

    // Shape mismatch: refused, and no file appears.
    let wrong = Array3::<u8>::zeros((3, 4, 6));
    let err = write_labels(&out, wrong.view(), &reference).unwrap_err();
    assert!(err.to_string().contains("seg.nii.gz"), "{err}");
    assert!(err.to_string().contains("[3, 4, 6]"), "{err}");
    assert!(entries(d.path()).is_empty());

    // An existing output survives a failure that happens mid-stream.
    let good = Array3::<u8>::ones((3, 4, 5));
    write_labels(&out, good.view(), &reference).unwrap();
    let before = fs::read(&out).unwrap();
    let mut vol = Volume::new(Array4::zeros((1, 3, 4, 5)), Matrix4::identity());
    vol.data[[0, 2, 3, 4]] = -1.0;
    let err = write_volume(&out, &vol, DataType::U8).unwrap_err();
    assert!(matches!(err, NiftiIoError::InvalidWrite { .. }), "{err}");
    assert_eq!(fs::read(&out).unwrap(), before);
    assert_eq!(entries(d.path()), vec![out.clone()]);

    // A directory that does not exist: an I/O error naming the path.
    let nowhere = d.path().join("no/such/dir/seg.nii");
    let err = write_labels(&nowhere, good.view(), &reference).unwrap_err();
    assert!(matches!(err, NiftiIoError::Write(_)), "{err}");
    assert!(err.to_string().contains("seg.nii"), "{err}");
}
