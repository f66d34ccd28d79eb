//! The degradation and scoring commands of the peer benchmark
//! (scripts/bench-brain.sh) on a real scan, the ITK example subject
//! (128 x 128 x 62 at 2 x 2 x 3 mm): each degraded pair has the geometry
//! it claims, with world positions kept, and a mask scores Dice 1, HD95 0
//! against itself.

use std::path::{Path, PathBuf};

use infl8_core::Volume;
use infl8_core::nifti_io::{ReadLimits, read_volume};
use infl8_suite::{brain_case, ok, run, s};
use nalgebra::{Matrix4, Vector4};
use serde_json::Value;

fn read(p: &Path) -> Volume {
    read_volume(p, &ReadLimits::default()).unwrap()
}

fn world(a: &Matrix4<f64>, i: f64, j: f64, k: f64) -> Vector4<f64> {
    a * Vector4::new(i, j, k, 1.0)
}

/// Runs `degrade --kind KIND ARGS` on the ITK subject; returns the
/// (image, label) written.
fn degrade(dir: &Path, kind: &str, args: &[&str]) -> (PathBuf, PathBuf) {
    let (image, label) = brain_case("itk-t1");
    let oi = dir.join(format!("{kind}_image.nii.gz"));
    let ol = dir.join(format!("{kind}_label.nii.gz"));
    let mut all = vec![
        "degrade",
        "--input",
        s(&image),
        "--label",
        s(&label),
        "--kind",
        kind,
        "--out-image",
        s(&oi),
        "--out-label",
        s(&ol),
    ];
    all.extend_from_slice(args);
    ok(&run("infl8-train", &all));
    (oi, ol)
}

fn score(pred: &Path, reference: &Path) -> Value {
    let out = ok(&run(
        "infl8-train",
        &[
            "score",
            "--pred",
            s(pred),
            "--reference",
            s(reference),
            "--json",
        ],
    ));
    serde_json::from_str(out.trim()).unwrap()
}

fn assert_self_score(label: &Path) {
    let sc = score(label, label);
    assert_eq!(sc["dice"], 1.0, "{sc}");
    assert_eq!(sc["hd95_mm"], 0.0, "{sc}");
    assert_eq!(sc["volume_error"], 0.0, "{sc}");
    assert!(sc["reference_voxels"].as_u64().unwrap() > 10_000, "{sc}");
}

#[test]
fn thick_slices_keep_slice_positions_and_self_score_perfectly() {
    let dir = tempfile::tempdir().unwrap();
    let src = read(&brain_case("itk-t1").0);
    // Axis 2 holds 62 slices of 3 mm: 6 mm keeps 31, from old slice 0.5.
    let (oi, ol) = degrade(
        dir.path(),
        "thick-slice",
        &["--axis", "2", "--thickness", "6"],
    );
    let (img, lab) = (read(&oi), read(&ol));
    assert_eq!(img.dims(), [128, 128, 31]);
    assert_eq!(lab.dims(), img.dims());
    assert!((img.spacing[2] - 6.0).abs() < 1e-4, "{:?}", img.spacing);
    assert!((img.spacing[0] - src.spacing[0]).abs() < 1e-4);
    for m in [0.0, 7.0, 30.0] {
        let got = world(&img.affine, 5.0, 9.0, m);
        let want = world(&src.affine, 5.0, 9.0, 0.5 + 2.0 * m);
        assert!((got - want).norm() < 1e-3, "slice {m}: {got} vs {want}");
    }
    assert_self_score(&ol);
}

#[test]
fn reorient_and_fov_cut_keep_world_positions() {
    let dir = tempfile::tempdir().unwrap();
    let src = read(&brain_case("itk-t1").0);
    let (oi, ol) = degrade(dir.path(), "reorient", &["--axes", "2,0,1", "--flip", "0"]);
    let img = read(&oi);
    assert_eq!(img.dims(), [62, 128, 128]);
    let inv = src.affine.try_inverse().unwrap();
    for (i, j, k) in [(0, 0, 0), (61, 5, 100), (30, 127, 64)] {
        let w = world(&img.affine, i as f64, j as f64, k as f64);
        let o = inv * w;
        let o = [o.x, o.y, o.z].map(|v| v.round() as usize);
        assert_eq!(img.data[[0, i, j, k]], src.data[[0, o[0], o[1], o[2]]]);
    }
    assert_self_score(&ol);

    let (oi, ol) = degrade(dir.path(), "fov-cut", &["--above-bottom", "20"]);
    let (img, lab) = (read(&oi), read(&ol));
    // Axis 1 is inferior-superior (2 mm): 20 mm cuts about 10 slices more
    // than the brain's lowest one, from the bottom.
    let d = img.dims();
    assert!(d[0] == 128 && d[2] == 62 && d[1] < 128 - 9, "{d:?}");
    let cut = 128 - d[1];
    for (i, j, k) in [(3, 0, 5), (64, 40, 31)] {
        let w = world(&img.affine, i as f64, j as f64, k as f64);
        assert!((w - world(&src.affine, i as f64, (j + cut) as f64, k as f64)).norm() < 1e-3);
        assert_eq!(img.data[[0, i, j, k]], src.data[[0, i, j + cut, k]]);
    }
    let brain = lab.data.iter().filter(|&&v| v != 0.0).count();
    assert!(brain > 0);
    assert_self_score(&ol);
}

#[test]
fn resample_and_bias_noise_give_the_stated_grid() {
    let dir = tempfile::tempdir().unwrap();
    let (oi, ol) = degrade(
        dir.path(),
        "resample",
        &["--spacing", "3,3,3", "--rotate", "10,-5,0"],
    );
    let img = read(&oi);
    for sp in img.spacing {
        assert!((sp - 3.0).abs() < 1e-4, "{:?}", img.spacing);
    }
    assert_self_score(&ol);

    let (image, label) = brain_case("itk-t1");
    let (oi, ol) = degrade(
        dir.path(),
        "bias-noise",
        &["--bias", "0.4", "--noise", "0.05", "--seed", "3"],
    );
    let (src, img) = (read(&image), read(&oi));
    assert_eq!(img.dims(), src.dims());
    assert!((img.affine - src.affine).abs().max() < 1e-4);
    assert_ne!(img.data, src.data);
    // The labels are the source's, so the reference scores itself.
    let sc = score(&ol, &label);
    assert_eq!(sc["dice"], 1.0, "{sc}");
}

#[test]
fn score_refuses_masks_on_different_grids_and_draws_the_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let (image, label) = brain_case("itk-t1");
    let (_, thick) = degrade(
        dir.path(),
        "thick-slice",
        &["--axis", "2", "--thickness", "6"],
    );
    let out = run(
        "infl8-train",
        &["score", "--pred", s(&thick), "--reference", s(&label)],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("must share a grid") && err.contains(s(&thick)),
        "{err}"
    );

    let png = dir.path().join("overlay.png");
    let said = ok(&run(
        "infl8-train",
        &[
            "score",
            "--pred",
            s(&label),
            "--reference",
            s(&label),
            "--image",
            s(&image),
            "--overlay",
            s(&png),
        ],
    ));
    assert!(said.contains("dice 1.0000"), "{said}");
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
}
