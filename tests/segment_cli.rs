//! End to end: the `infl8` binary segments a real MRI through the tract
//! plugin loaded from its shared library.

use infl8_core::nifti_io::{self, ReadLimits};
use infl8_suite::{
    command, example_model, infl8, mni152, ok, plugin_profile, s, segment, small_volumes, t1_2mm,
};

#[test]
fn segments_a_real_mri_on_the_input_grid() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 48);
    let out = dir.path().join("mask.nii.gz");
    let logits = dir.path().join("logits.nii.gz");
    let input = t1_2mm();
    ok(&segment(
        &model,
        &input,
        &out,
        &["--save-logits", s(&logits), "--threads", "2"],
    ));
    let limits = ReadLimits::default();
    let vin = nifti_io::read_volume(&input, &limits).unwrap();
    let vout = nifti_io::read_volume(&out, &limits).unwrap();
    assert_eq!(vout.dims(), vin.dims());
    assert_eq!(vout.channels(), 1);
    assert!((vout.affine - vin.affine).abs().max() < 1e-5);
    let hin = vin.header.as_ref().unwrap();
    let hout = vout.header.as_ref().unwrap();
    assert_eq!(hout.sform_code, hin.sform_code);
    assert_eq!(hout.qform_code, hin.qform_code);
    assert_eq!(hout.xyzt_units, hin.xyzt_units);
    assert_eq!(hout.datatype, 2, "labels are uint8");
    assert!(vout.data.iter().all(|&v| v == 0.0 || v == 1.0));

    // The head mask must contain the brain (the template's own brain mask)
    // and leave the air around the head as background.
    let brain = nifti_io::read_volume(
        &mni152("tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz"),
        &limits,
    )
    .unwrap();
    let (mut in_brain, mut brain_total, mut head) = (0usize, 0usize, 0usize);
    for (b, l) in brain.data.iter().zip(vout.data.iter()) {
        if *b > 0.0 {
            brain_total += 1;
            if *l == 1.0 {
                in_brain += 1;
            }
        }
        if *l == 1.0 {
            head += 1;
        }
    }
    let covered = in_brain as f64 / brain_total as f64;
    let head_frac = head as f64 / vout.data.len() as f64;
    assert!(covered > 0.99, "brain covered {covered}");
    assert!((0.3..0.8).contains(&head_frac), "head fraction {head_frac}");

    let vl = nifti_io::read_volume(&logits, &limits).unwrap();
    assert_eq!(vl.channels(), 2, "logits are channel-last [X,Y,Z,K]");
    assert_eq!(vl.dims(), vin.dims());
    // Logits and labels agree: label 1 where logit 1 > logit 0.
    let mut disagree = 0;
    for ((i, j, k), &l) in vout.data.index_axis(ndarray::Axis(0), 0).indexed_iter() {
        let fg = vl.data[[1, i, j, k]] > vl.data[[0, i, j, k]];
        if fg != (l == 1.0) {
            disagree += 1;
        }
    }
    assert_eq!(disagree, 0);
}

#[test]
fn flipped_storage_gives_the_same_segmentation_in_world_space() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 48);
    let limits = ReadLimits::default();
    let input = t1_2mm();
    let v = nifti_io::read_volume(&input, &limits).unwrap();

    // Same scan stored with the first axis reversed; the affine compensates,
    // so every voxel keeps its world position.
    let mut flipped = v.clone();
    flipped.data.invert_axis(ndarray::Axis(1));
    let n = v.dims()[0] as f64;
    for r in 0..3 {
        flipped.affine[(r, 3)] += v.affine[(r, 0)] * (n - 1.0);
        flipped.affine[(r, 0)] = -v.affine[(r, 0)];
    }
    flipped.header = None;
    let flipped_path = dir.path().join("flipped.nii.gz");
    nifti_io::write_volume(&flipped_path, &flipped, nifti_io::OutputType::F32).unwrap();

    let out_a = dir.path().join("a.nii.gz");
    let out_b = dir.path().join("b.nii.gz");
    for (i, o) in [(&input, &out_a), (&flipped_path, &out_b)] {
        ok(&infl8(&[
            "segment",
            "--model",
            s(&model),
            "--input",
            s(i),
            "--output",
            s(o),
        ]));
    }
    let a = nifti_io::read_volume(&out_a, &limits).unwrap();
    let mut b = nifti_io::read_volume(&out_b, &limits).unwrap();
    assert!((b.affine - flipped.affine).abs().max() < 1e-4);
    b.data.invert_axis(ndarray::Axis(1));
    let differ = a
        .data
        .iter()
        .zip(b.data.iter())
        .filter(|(x, y)| x != y)
        .count();
    assert_eq!(differ, 0, "{differ} voxels differ in world space");
}

#[test]
fn foreign_model_without_manifest_runs_with_flags() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("foreign.onnx");
    let m = infl8_onnx::examples::pointwise_model(&[-1.0, 1.0], &[0.5, -0.5], 1);
    infl8_onnx::write_model(&m, &model).unwrap();
    let input = t1_2mm();
    let out = dir.path().join("seg.nii.gz");

    // No manifest, symbolic spatial dims: the window size must be given.
    let r = segment(&model, &input, &out, &[]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("--roi") && err.contains("foreign.onnx"),
        "{err}"
    );
    assert!(!out.exists());

    ok(&infl8(&[
        "segment",
        "--model",
        s(&model),
        "--input",
        s(&input),
        "--output",
        s(&out),
        "--roi",
        "40",
        "40",
        "40",
        "--window",
        "0",
        "4000",
        "--overlap",
        "0.5",
        "--mode",
        "constant",
    ]));
    // out = argmax(-x + 0.5, x - 0.5) = (window(x) > 0.5) = raw > 2000.
    let limits = ReadLimits::default();
    let vin = nifti_io::read_volume(&input, &limits).unwrap();
    let vout = nifti_io::read_volume(&out, &limits).unwrap();
    let wrong = vin
        .data
        .iter()
        .zip(vout.data.iter())
        .filter(|(x, l)| {
            // Skip values so close to the threshold that float rounding decides.
            (**x - 2000.0).abs() > 1.0 && ((**x > 2000.0) != (**l == 1.0))
        })
        .count();
    assert_eq!(wrong, 0);
}

#[test]
fn folder_mode_segments_every_volume() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 48);
    let inbox = dir.path().join("in");
    let outbox = dir.path().join("out");
    std::fs::create_dir_all(&inbox).unwrap();
    std::fs::copy(t1_2mm(), inbox.join("a.nii.gz")).unwrap();
    std::fs::copy(t1_2mm(), inbox.join("b.nii.gz")).unwrap();
    std::fs::write(inbox.join("notes.txt"), "not an image").unwrap();
    ok(&segment(&model, &inbox, &outbox, &[]));
    assert_eq!(std::fs::read_dir(&outbox).unwrap().count(), 2);
    // Each output is the input's own segmentation: what a single-file run
    // gives, on the input's grid.
    let single = dir.path().join("single.nii.gz");
    ok(&segment(&model, &t1_2mm(), &single, &[]));
    let limits = ReadLimits::default();
    let want = nifti_io::read_volume(&single, &limits).unwrap();
    let head = want.data.iter().filter(|&&l| l == 1.0).count() as f64 / want.data.len() as f64;
    assert!((0.3..0.8).contains(&head), "head fraction {head}");
    for name in ["a.nii.gz", "b.nii.gz"] {
        let got = nifti_io::read_volume(&outbox.join(name), &limits).unwrap();
        assert_eq!(got.dims(), want.dims(), "{name}");
        assert_eq!(got.affine, want.affine, "{name}");
        assert_eq!(got.data, want.data, "{name}");
    }
}

#[test]
fn bad_inputs_fail_cleanly_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 48);
    let bytes = std::fs::read(t1_2mm()).unwrap();
    let truncated = dir.path().join("truncated.nii.gz");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let garbage = dir.path().join("garbage.nii");
    std::fs::write(&garbage, vec![7u8; 1000]).unwrap();
    for bad in [&truncated, &garbage] {
        let out = dir.path().join("out.nii.gz");
        let r = infl8(&[
            "segment",
            "--model",
            s(&model),
            "--input",
            s(bad),
            "--output",
            s(&out),
        ]);
        assert!(!r.status.success());
        let err = String::from_utf8_lossy(&r.stderr);
        let name = bad.file_name().unwrap().to_str().unwrap();
        assert!(err.contains(name), "error should name {name}: {err}");
        assert!(!out.exists());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("out.nii"))
            .collect();
        assert!(leftovers.is_empty(), "partial output left: {leftovers:?}");
    }

    // Too large for the configured limit: refused from the header.
    let out = dir.path().join("big.nii.gz");
    let r = segment(&model, &t1_2mm(), &out, &["--max-voxels", "1000"]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("more than the limit of 1000 (limits.max_voxels)")
            && err.contains("tpl-MNI152NLin6Asym_res-02_T1w.nii.gz")
            && err.contains("[91, 109, 91]"),
        "{err}"
    );
    assert!(!out.exists());

    // A backend nobody provides.
    let r = segment(&model, &t1_2mm(), &out, &["--backend", "no-such-backend"]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("no-such-backend") && err.contains("tract"),
        "{err}"
    );

    // A model whose input channels do not fit the volume.
    let two = dir.path().join("two-channel.onnx");
    let m = infl8_onnx::examples::pointwise_model(&[-1.0, 1.0], &[0.0, 0.0], 2);
    infl8_onnx::write_model(&m, &two).unwrap();
    let r = segment(&two, &t1_2mm(), &out, &["--roi", "32", "32", "32"]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("channel"), "{err}");
    assert!(!out.exists());
}

#[test]
fn info_and_plugins_commands() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 48);
    let r = infl8(&["info", s(&model), "--load"]);
    ok(&r);
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        text.contains("sliding_window") && text.contains("image"),
        "{text}"
    );
    assert!(text.contains("loaded on tract"), "{text}");
    // The manifest printed is the one in the model file, whole.
    let start = text
        .find("manifest (ONNX metadata):\n")
        .expect("manifest line")
        + 26;
    let end = start + text[start..].find("\n}").expect("end of the manifest") + 2;
    let printed: infl8_core::manifest::Manifest = serde_json::from_str(&text[start..end])
        .unwrap_or_else(|e| panic!("{e}: {}", &text[start..end]));
    let (stored, _) = infl8_core::manifest::find(&model).unwrap().unwrap();
    assert_eq!(printed, stored);
    match &stored.inference {
        infl8_core::manifest::InferenceMode::SlidingWindow(sw) => assert_eq!(sw.roi, [48; 3]),
        other => panic!("{other:?}"),
    }

    let r = infl8(&["plugins"]);
    ok(&r);
    let text = String::from_utf8_lossy(&r.stdout);
    // The tract row names a library that exists and is the one built here.
    let row = text
        .lines()
        .find(|l| l.starts_with("tract "))
        .unwrap_or_else(|| panic!("no tract row in:\n{text}"));
    let library = std::path::PathBuf::from(row.split_whitespace().last().unwrap());
    assert!(library.is_file(), "{row}");
    assert_eq!(
        library.canonicalize().unwrap(),
        infl8_suite::plugin_lib("infl8_tract")
            .canonicalize()
            .unwrap()
    );
}

#[test]
fn info_prints_the_flops_of_one_window() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("example.onnx");
    ok(&infl8(&[
        "example-model",
        "--out",
        s(&model),
        "--roi",
        "100",
        "100",
        "250",
    ]));
    let text = ok(&infl8(&["info", s(&model)]));
    // One 3x3x3 conv, 1 -> 2 channels, same-size output:
    // 2 FLOPs x 2 channels x 100*100*250 voxels x 1 channel x 27 = 0.27 GFLOP.
    assert!(
        text.contains("FLOPs per window: 0.27 GFLOP (Conv 0.27) for input [1, 1, 100, 100, 250]"),
        "{text}"
    );
}

#[test]
fn example_model_segments_the_head_of_a_real_mri() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("example-head-mask.onnx");
    ok(&infl8(&["example-model", "--out", s(&model)]));
    // Into a folder that does not exist yet.
    let out = dir.path().join("out/head_mask.nii.gz");
    ok(&segment(&model, &t1_2mm(), &out, &[]));
    let v = nifti_io::read_volume(&out, &ReadLimits::default()).unwrap();
    let head = v.data.iter().filter(|&&l| l == 1.0).count() as f64 / v.data.len() as f64;
    assert!((0.3..0.8).contains(&head), "head fraction {head}");
}

/// A plugin that aborts or hangs inside a call fails its volumes with a
/// message naming it, in a worker process per volume: the command itself
/// neither dies with the plugin nor waits past `limits.timeout_s`, the
/// report lists every volume, and no temporary file is left behind.
#[test]
fn a_plugin_that_aborts_or_hangs_fails_each_volume_with_a_clear_error() {
    for (backend, limits, isolation, expected) in [
        ("crash-abort", "", "process", "SIGABRT"),
        // `auto`: a timeout is set, so each volume runs in a worker.
        ("crash-hang", "timeout_s = 1", "auto", "timed out"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (inbox, outbox) = (root.join("in"), root.join("out"));
        std::fs::create_dir_all(&inbox).unwrap();
        for (name, bytes) in ["a.nii.gz", "b.nii.gz"].iter().zip(small_volumes(2)) {
            std::fs::write(inbox.join(name), bytes).unwrap();
        }
        let model = example_model(root, 16);
        let config = plugin_profile(root, "infl8test_crashing", backend, limits);
        let report = root.join("report.json");
        let t = std::time::Instant::now();
        let out = command("infl8")
            .args(["segment", "--model", s(&model), "--input", s(&inbox)])
            .args(["--output", s(&outbox), "--config", s(&config)])
            .args(["--report", s(&report), "--isolation", isolation])
            .output()
            .unwrap();
        let took = t.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{backend}: {stderr}");
        for name in ["a.nii.gz", "b.nii.gz"] {
            let line = stderr
                .lines()
                .find(|l| l.contains(name) && l.contains(expected))
                .unwrap_or_else(|| panic!("{backend}: no error naming {name}:\n{stderr}"));
            assert!(line.contains(backend), "{backend}: {line}");
        }
        if backend == "crash-abort" {
            assert!(stderr.contains("libinfl8_infl8test_crashing"), "{stderr}");
        } else {
            // Two volumes, each killed a grace second past its 1 s limit,
            // plus two model loads: far from a hang.
            assert!(took.as_secs() < 30, "{backend}: took {took:?}");
        }
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let errors: Vec<&str> = r
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["error"].as_str())
            .collect();
        assert_eq!(errors.len(), 2, "{backend}: {r}");
        let left: Vec<_> = std::fs::read_dir(&outbox).unwrap().collect();
        assert!(left.is_empty(), "{backend}: left {left:?}");
    }
}

/// A worker process gives the same labels as the command's own process.
#[test]
fn a_volume_in_a_worker_process_gives_the_same_labels() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 32);
    let [inproc, worker] = ["off", "process"].map(|isolation| {
        let out = dir.path().join(format!("{isolation}.nii.gz"));
        ok(&segment(
            &model,
            &t1_2mm(),
            &out,
            &["--isolation", isolation],
        ));
        nifti_io::read_volume(&out, &ReadLimits::default()).unwrap()
    });
    assert_eq!(inproc.data, worker.data);
    assert_eq!(inproc.affine, worker.affine);
}

/// A folder holding a real DICOM series (PyPI pydicom's 5-slice CT,
/// scripts/fetch-dicom-data.sh) is segmented as one volume: the labels land
/// on the series' own grid, as infl8-dicom reads it. Series that are not one
/// volume, and a `--series` the folder lacks, fail naming the problem,
/// without output.
#[test]
fn a_dicom_series_folder_is_segmented_on_its_own_grid() {
    let sets = infl8_suite::repo_root()
        .join(".cache/dicom-data/pydicom-3.0.2/pydicom/data/test_files/dicomdirtests");
    let ct = sets.join("98892001/CT5N");
    assert!(ct.is_dir(), "run scripts/fetch-dicom-data.sh");
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 16);
    let out = dir.path().join("ct.nii.gz");
    ok(&segment(&model, &ct, &out, &[]));
    let labels = nifti_io::read_volume(&out, &ReadLimits::default()).unwrap();
    let series = infl8_dicom::scan_folder(&ct).unwrap();
    let vol = infl8_dicom::read_series(&series[0]).unwrap();
    assert_eq!(labels.dims(), vol.dims());
    assert!(
        (labels.affine - vol.affine).abs().max() < 1e-4,
        "{}",
        labels.affine
    );

    let bad = dir.path().join("bad.nii.gz");
    let o = segment(&model, &sets.join("77654033/CT2"), &bad, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("uneven slice spacing"),
        "{err}"
    );
    assert!(!bad.exists());
    let o = segment(&model, &ct, &bad, &["--series", "1.2.3"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("series 1.2.3"), "{err}");
    assert!(!bad.exists());
}
