//! `infl8-train quantize` on the shipped brain-mask model: calibrated on
//! one training template, compared with FP32 on a held-out scan with its
//! reference mask, and the INT8 model then segments that scan through
//! `infl8 segment` on both CPU backends.

use std::path::Path;

use infl8_core::metrics::hard_dice;
use infl8_core::nifti_io::{self, ReadLimits};
use infl8_suite::{brain_case, brain_model, infl8, infl8_ort, ok, run, s, segment};

fn labels(p: &Path) -> Vec<u8> {
    let v = nifti_io::read_volume(p, &ReadLimits::default()).unwrap();
    v.data.iter().map(|&x| x.round() as u8).collect()
}

#[test]
fn quantized_brain_model_matches_fp32_on_both_cpu_backends() {
    let dir = tempfile::tempdir().unwrap();
    let (calib, _) = brain_case("mni152-fsl-3mm");
    let (image, _) = brain_case("itk-t1");
    let int8 = dir.path().join("brain-mask.int8.onnx");
    let report = dir.path().join("report.json");
    let stdout = ok(&run(
        "infl8-train",
        &[
            "quantize",
            "--model",
            s(&brain_model()),
            "--calib",
            s(&calib),
            "--eval",
            s(&image),
            "--out",
            s(&int8),
            "--report",
            s(&report),
        ],
    ));
    // The per-layer table and the accuracy summary are printed.
    assert!(stdout.contains("SQNR dB"), "{stdout}");
    assert!(stdout.contains("mean Dice INT8 vs FP32"), "{stdout}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let e = &r["eval"][0];
    assert_eq!(e["id"], "itk-t1");
    let d = e["dice_int8_vs_fp32"][0].as_f64().unwrap();
    assert!(d > 0.98, "INT8 vs FP32 Dice {d}");
    // The sibling label file was found and scored.
    let t = e["dice_int8_vs_truth"][0].as_f64().unwrap();
    assert!(t > 0.75, "INT8 vs truth Dice {t}");

    // The INT8 model keeps the manifest: it runs without any flag.
    let fp32_out = dir.path().join("fp32.nii.gz");
    ok(&segment(&brain_model(), &image, &fp32_out, &[]));
    let info = ok(&infl8(&["info", s(&int8)]));
    assert!(info.contains("precision: INT8 QDQ"), "{info}");
    assert!(info.contains("FLOPs per window"), "{info}");
    let reference = labels(&fp32_out);
    for backend in ["tract", "ort-cpu"] {
        let out = dir.path().join(format!("int8-{backend}.nii.gz"));
        ok(&infl8_ort(&[
            "segment",
            "--backend",
            backend,
            "--model",
            s(&int8),
            "--input",
            s(&image),
            "--output",
            s(&out),
        ]));
        let d = hard_dice(&labels(&out), &reference, 1).unwrap();
        assert!(d > 0.98, "{backend}: INT8 vs FP32 Dice {d}");
    }
}

#[test]
fn a_corrupt_calibration_volume_is_named_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken_image.nii.gz");
    std::fs::write(&bad, [0x1f, 0x8b, 0, 1, 2, 3]).unwrap();
    let out_path = dir.path().join("int8.onnx");
    let out = run(
        "infl8-train",
        &[
            "quantize",
            "--model",
            s(&brain_model()),
            "--calib",
            s(&bad),
            "--out",
            s(&out_path),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken_image.nii.gz"), "{err}");
    assert!(!out_path.exists());
}
