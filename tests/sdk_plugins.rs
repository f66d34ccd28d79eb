//! The plugin SDK's examples, used as a vendor would use them: the C
//! reference plugin (compiled here with the system C compiler against the
//! committed header) and the Rust example pass `infl8 plugin check`, segment
//! a real scan through `infl8 segment` as tract does, and refuse what they
//! cannot run with messages that say why.

use std::path::Path;
use std::process::{Command, Output};

use infl8_core::nifti_io::{self, ReadLimits};
use infl8_core::volume::Volume;
use infl8_suite::{
    c_reference_plugin, compile_c, example_model, infl8, ok, plugin_lib, repo_root, s, t1_2mm,
};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn conforms(lib: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.json");
    let o = infl8(&["plugin", "check", s(lib), "--json", s(&report)]);
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["conforms"], true, "{out}");
    // 7 library checks + 11 for the one backend, none skipped.
    assert_eq!(r["passed"], 18, "{out}");
}

#[test]
fn c_reference_plugin_conforms() {
    conforms(&c_reference_plugin());
}

/// The C steps of plugins/sdk/README.md, in an empty folder: copy the header
/// and the example, `make`, check.
#[test]
fn the_guides_c_steps_give_a_conforming_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let sdk = repo_root().join("plugins/sdk");
    std::fs::copy(
        sdk.join("include/infl8_plugin.h"),
        dir.path().join("infl8_plugin.h"),
    )
    .unwrap();
    for f in ["plugin.c", "onnx_mini.c", "onnx_mini.h", "Makefile"] {
        std::fs::copy(sdk.join("examples/c-reference").join(f), dir.path().join(f)).unwrap();
    }
    let make = Command::new("make")
        .arg("SDK_INCLUDE=.")
        .current_dir(dir.path())
        .output()
        .expect("run make");
    assert!(
        make.status.success(),
        "{}\n{}",
        stdout(&make),
        String::from_utf8_lossy(&make.stderr)
    );
    conforms(&dir.path().join("libinfl8_cref.so"));
}

#[test]
fn rust_example_plugin_conforms() {
    conforms(&plugin_lib("infl8_example_rust"));
}

/// `infl8 segment` of the real 2 mm T1 on `backend`, found in `plugin_dir`;
/// returns the labels and logits.
fn segment(dir: &Path, model: &Path, backend: &str, plugin_dir: &Path) -> (Volume, Volume) {
    let labels = dir.join(format!("{backend}-mask.nii.gz"));
    let logits = dir.join(format!("{backend}-logits.nii.gz"));
    ok(&infl8(&[
        "segment",
        "--model",
        s(model),
        "--input",
        s(&t1_2mm()),
        "--output",
        s(&labels),
        "--save-logits",
        s(&logits),
        "--backend",
        backend,
        "--plugin-dir",
        s(plugin_dir),
    ]));
    let limits = ReadLimits::default();
    (
        nifti_io::read_volume(&labels, &limits).unwrap(),
        nifti_io::read_volume(&logits, &limits).unwrap(),
    )
}

#[test]
fn c_reference_segments_a_real_scan_like_tract() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 32);
    let cref = c_reference_plugin();
    let (c_labels, c_logits) = segment(dir.path(), &model, "c-reference", cref.parent().unwrap());
    let tract_dir = plugin_lib("infl8_tract");
    let (t_labels, t_logits) = segment(dir.path(), &model, "tract", tract_dir.parent().unwrap());

    assert_eq!(c_labels.dims(), t_labels.dims());
    assert_eq!(c_logits.data.shape(), t_logits.data.shape());
    let worst = c_logits
        .data
        .iter()
        .zip(t_logits.data.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "logits differ from tract by up to {worst}");
    let head = c_labels.data.iter().filter(|&&v| v == 1.0).count();
    assert!(
        head > c_labels.data.len() / 10,
        "the C plugin found almost no head ({head} voxels): it must compute, not return zeros"
    );
    // Labels can only differ where the two logits tie to within rounding.
    let differ = c_labels
        .data
        .iter()
        .zip(t_labels.data.iter())
        .filter(|(a, b)| a != b)
        .count();
    assert!(differ <= 10, "{differ} labels differ from tract");
}

#[test]
fn c_reference_refuses_what_it_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let cref = c_reference_plugin();
    let plugin_dir = cref.parent().unwrap();
    let input = t1_2mm();
    let run = |model: &Path, extra: &[&str]| {
        let mut args = vec![
            "segment",
            "--model",
            s(model),
            "--input",
            s(&input),
            "--output",
            "/nonexistent/never-written.nii.gz",
            "--backend",
            "c-reference",
            "--plugin-dir",
            s(plugin_dir),
        ];
        args.extend_from_slice(extra);
        let o = infl8(&args);
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // The shipped ViT model has int64 shape constants and operators a
    // float32 Conv runner does not have: whichever it meets first, the
    // refusal names the file and what c-reference lacks.
    let vit = repo_root().join("models/brain-mask.onnx");
    let err = run(&vit, &[]);
    assert!(
        err.contains("brain-mask.onnx")
            && (err.contains("is not supported by c-reference")
                || err.contains("c-reference runs float32")),
        "{err}"
    );
    // Reduced precision is refused, not silently ignored.
    let model = example_model(dir.path(), 16);
    let profile = dir.path().join("fp16.toml");
    std::fs::write(&profile, "precision = \"fp16\"\n").unwrap();
    let err = run(&model, &["--config", s(&profile)]);
    assert!(err.contains("fp32 only"), "{err}");
}

/// The C runner's parser and executor under AddressSanitizer and UBSan:
/// every truncation and many corruptions of a real model file.
#[test]
fn c_reference_survives_damaged_models_under_sanitizers() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 8);
    let src = repo_root().join("plugins/sdk/examples/c-reference");
    let exe = dir.path().join("selftest");
    let flags = [
        "-std=c11",
        "-O1",
        "-g",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        "-Wall",
        "-Wextra",
        "-Werror",
    ];
    compile_c(
        &flags,
        &exe,
        &[src.join("selftest.c"), src.join("onnx_mini.c")],
        "the sanitized self-test",
    );
    let run = Command::new(&exe)
        .arg(&model)
        .env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
        .output()
        .unwrap();
    let out = stdout(&run);
    assert!(
        run.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(out.contains("no fault"), "{out}");
}
