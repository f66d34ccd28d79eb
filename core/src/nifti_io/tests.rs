//! Tests of reading, the affine and writing, round-tripped through files.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;
use nalgebra::Matrix4;
use ndarray::{Array3, Array4, Axis};
use nifti::NiftiHeader;

use super::affine::*;
use super::read::*;
use super::write::*;
use super::*;
use crate::volume::Volume;

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
