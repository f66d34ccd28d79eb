//! infl8's resampling against MONAI's own numbers.
//!
//! The fixtures in `tests/fixtures/resample` were computed by MONAI 1.6.1
//! (`Orientationd("RAS")` + `Spacingd(pixdim, mode="bilinear")`, then
//! `Invertd`; see the README there): an LPS CT-like volume, a 1 mm volume
//! taken to 2 mm, and an oblique one. infl8 must give the same grid (shape
//! and affine), the same values, and the same inverse, to 1e-4.

use std::path::{Path, PathBuf};

use infl8_core::Volume;
use infl8_core::nifti_io::{DataType, ReadLimits, read_volume, write_volume};
use infl8_core::preprocess::{Normalization, PreprocessSpec, preprocess};
use infl8_suite::npy;
use nalgebra::Matrix4;
use ndarray::{Array4, ArrayD, Ix3};
use serde_json::Value;

const TOLERANCE: f64 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resample")
}

fn volume(name: &str, what: &str) -> ArrayD<f32> {
    npy::read_f32(fixtures().join(format!("{name}_{what}.npy"))).unwrap()
}

fn affine(name: &str, what: &str) -> Matrix4<f64> {
    let a = npy::read_f64(fixtures().join(format!("{name}_{what}_affine.npy"))).unwrap();
    assert_eq!(a.shape(), &[4, 4], "{name} {what} affine");
    Matrix4::from_row_slice(a.as_slice().unwrap())
}

fn dims(v: &Value) -> [usize; 3] {
    let a: Vec<usize> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    [a[0], a[1], a[2]]
}

fn max_diff<'a>(a: impl IntoIterator<Item = &'a f32>, b: impl IntoIterator<Item = &'a f32>) -> f64 {
    a.into_iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs())
        .fold(0.0, f64::max)
}

/// The input as MONAI saw it: written to NIfTI and read back, so the
/// affine is the file's f32 sform (which decides, for the oblique case,
/// whether MONAI keeps the first voxel centre or centres the new grid).
fn through_nifti(dir: &Path, name: &str) -> Volume {
    let data = volume(name, "input").into_dimensionality::<Ix3>().unwrap();
    let data = data.insert_axis(ndarray::Axis(0));
    let path = dir.join(format!("{name}.nii.gz"));
    write_volume(
        &path,
        &Volume::new(data, affine(name, "input")),
        DataType::F32,
    )
    .unwrap();
    read_volume(&path, &ReadLimits::default()).unwrap()
}

fn check_case(dir: &Path, name: &str, case: &Value) {
    let target: Vec<f64> = case["target_spacing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let input = through_nifti(dir, name);
    assert_eq!(input.dims(), dims(&case["input_shape"]), "{name}");
    let spec = PreprocessSpec {
        reorient: true,
        target_spacing: Some([target[0], target[1], target[2]]),
        normalization: Normalization::None,
    };
    let (out, inverse) = preprocess(&input, &spec).unwrap();

    // Shape.
    let want = volume(name, "resampled");
    assert_eq!(out.dims(), dims(&case["resampled_shape"]), "{name}: shape");
    assert_eq!(&out.data.shape()[1..], want.shape(), "{name}: shape");

    // Affine.
    let want_affine = affine(name, "resampled");
    let err = (out.affine - want_affine).abs().max();
    assert!(
        err <= TOLERANCE,
        "{name}: affine off by {err}\ninfl8: {}MONAI: {want_affine}",
        out.affine
    );

    // Values.
    let err = max_diff(out.data.iter(), want.iter());
    assert!(err <= TOLERANCE, "{name}: resampled values off by {err}");

    // Inverse: the field i + 2j + 3k on the resampled grid, sent back to
    // the input's grid and storage order.
    let [x, y, z] = out.dims();
    let field = Array4::from_shape_fn((1, x, y, z), |(_, i, j, k)| (i + 2 * j + 3 * k) as f32);
    let back = inverse.logits(field).unwrap();
    let want = volume(name, "inverse");
    assert_eq!(&back.shape()[1..], want.shape(), "{name}: inverse shape");
    assert_eq!(want.shape(), &dims(&case["inverse_shape"])[..], "{name}");
    let err = max_diff(back.iter(), want.iter());
    assert!(err <= TOLERANCE, "{name}: inverse off by {err}");
}

fn cases() -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    cases.as_object().unwrap().clone()
}

#[test]
fn lps_ct_like_volume_matches_monai() {
    let dir = tempfile::tempdir().unwrap();
    check_case(dir.path(), "r1", &cases()["r1"]);
}

#[test]
fn one_mm_to_two_mm_matches_monai() {
    let dir = tempfile::tempdir().unwrap();
    check_case(dir.path(), "r2", &cases()["r2"]);
}

#[test]
fn oblique_volume_matches_monai() {
    let dir = tempfile::tempdir().unwrap();
    check_case(dir.path(), "r3", &cases()["r3"]);
}

#[test]
fn every_fixture_case_is_checked() {
    let mut names: Vec<String> = cases().keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["r1", "r2", "r3"]);
}
