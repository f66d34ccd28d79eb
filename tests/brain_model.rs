//! The shipped default model, `models/brain-mask.onnx`, on real T1 scans it
//! was not trained on (docs/data.md: the validation subjects), through the
//! README's main command on the tract plugin. The thresholds sit a little
//! under what models/brain-mask.md reports, so a regression in the model,
//! the preprocessing or the runtime fails here.

use std::path::Path;

use infl8_core::nifti_io::{self, ReadLimits};
use infl8_suite::{brain_case, brain_model, infl8, ok, s, segment};

fn dice(a: &Path, b: &Path) -> f64 {
    let limits = ReadLimits::default();
    let va = nifti_io::read_volume(a, &limits).unwrap();
    let vb = nifti_io::read_volume(b, &limits).unwrap();
    assert_eq!(va.dims(), vb.dims(), "{} vs {}", a.display(), b.display());
    let (mut both, mut total) = (0usize, 0usize);
    for (&x, &y) in va.data.iter().zip(vb.data.iter()) {
        let (x, y) = (x > 0.5, y > 0.5);
        both += usize::from(x && y);
        total += usize::from(x) + usize::from(y);
    }
    2.0 * both as f64 / total.max(1) as f64
}

/// Runs the README's main command on `id` and returns the Dice against its
/// reference mask.
fn segment_case(id: &str, dir: &Path) -> f64 {
    let (image, label) = brain_case(id);
    let out = dir.join(format!("{id}_mask.nii.gz"));
    let preview = dir.join(format!("{id}.png"));
    ok(&segment(
        &brain_model(),
        &image,
        &out,
        &["--preview", s(&preview)],
    ));
    let limits = ReadLimits::default();
    let vin = nifti_io::read_volume(&image, &limits).unwrap();
    let vout = nifti_io::read_volume(&out, &limits).unwrap();
    assert_eq!(
        vout.dims(),
        vin.dims(),
        "{id}: the mask is on the input grid"
    );
    assert!((vout.affine - vin.affine).abs().max() < 1e-5, "{id}");
    let png = std::fs::read(&preview).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{id}: preview is a PNG"
    );
    dice(&out, &label)
}

#[test]
fn shipped_model_carries_its_manifest_and_fits_the_size_budget() {
    let model = brain_model();
    let bytes = std::fs::metadata(&model).unwrap().len();
    assert!(bytes <= 30_000_000, "{} is {bytes} bytes", model.display());
    let info = ok(&infl8(&["info", s(&model)]));
    for want in ["infl8-brain-mask", "brain", "slab"] {
        assert!(info.contains(want), "`infl8 info` lacks {want:?}:\n{info}");
    }
    let gflop: f64 = info
        .lines()
        .find_map(|l| l.strip_prefix("FLOPs per window: "))
        .and_then(|l| l.split_once(" GFLOP"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("`infl8 info` lacks a FLOPs line:\n{info}"));
    assert!(gflop > 0.0, "{info}");
    assert!(
        info.contains("MatMul"),
        "the ViT blocks count as MatMul:\n{info}"
    );
}

#[test]
fn segments_the_held_out_colin27_subject() {
    let dir = tempfile::tempdir().unwrap();
    let d = segment_case("colin27", dir.path());
    assert!(d >= 0.89, "Dice {d:.4} on colin27");
}

#[test]
fn segments_the_held_out_itk_subject_stored_lsa_at_2x2x3_mm() {
    let dir = tempfile::tempdir().unwrap();
    let d = segment_case("itk-t1", dir.path());
    // Model v2 (thick-slice and tilt variants, head z-score) reached 0.937
    // here, v1 0.801: this guards the gain.
    assert!(d >= 0.92, "Dice {d:.4} on itk-t1");
}
