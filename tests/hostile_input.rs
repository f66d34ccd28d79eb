//! Issue 21, items 4 and 9: inputs, models and flags a hostile but realistic
//! user gives `infl8 segment`, each refused at once with the setting to
//! change, before anything large is allocated or any output is written.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;

use flate2::Compression;
use flate2::write::GzEncoder;
use infl8_core::nifti_io::{self, ReadLimits};
use infl8_suite::{example_model, infl8, ok, run_with_env, s, segment, t1_2mm};

fn stderr(r: &Output) -> String {
    String::from_utf8_lossy(&r.stderr).into_owned()
}

/// Asserts `r` failed with every one of `needles` in its stderr.
fn refused(r: &Output, needles: &[&str]) -> String {
    let e = stderr(r);
    assert!(!r.status.success(), "accepted:\n{e}");
    for n in needles {
        assert!(e.contains(n), "{n:?} missing from:\n{e}");
    }
    e
}

/// What a 24 GiB machine gets by default (half the physical memory), so the
/// test means the same on a bigger one.
const BUDGET_24_GIB: (&str, &str) = ("INFL8_LIMITS__MEMORY_BUDGET_MB", "12288");

fn segment_with_budget(args: &[&str]) -> Output {
    let mut all = vec!["segment"];
    all.extend_from_slice(args);
    run_with_env(
        "infl8",
        &all,
        &[(BUDGET_24_GIB.0, std::ffi::OsStr::new(BUDGET_24_GIB.1))],
    )
}

/// A model without a manifest whose window size follows the flags.
fn foreign_model(dir: &Path) -> PathBuf {
    let model = dir.join("foreign.onnx");
    let m = infl8_onnx::examples::pointwise_model(&[-1.0, 1.0], &[0.5, -0.5], 1);
    infl8_onnx::write_model(&m, &model).unwrap();
    model
}

#[test]
fn huge_windows_are_refused_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.nii.gz");
    let input = t1_2mm();
    // `--roi 1000 1000 1000` grew the importance map to 22.6 GB.
    let foreign = foreign_model(dir.path());
    let r = segment_with_budget(&[
        "--model",
        s(&foreign),
        "--input",
        s(&input),
        "--output",
        s(&out),
        "--window",
        "0",
        "4000",
        "--roi",
        "1000",
        "1000",
        "1000",
    ]);
    refused(&r, &["limits.memory_budget_mb", "model.roi"]);
    assert!(!out.exists());

    // A manifest roi of 100000.
    let sidecar = dir.path().join("foreign.onnx.json");
    std::fs::write(
        &sidecar,
        r#"{"format":1,"input_channels":1,"labels":["background","head"],
            "inference":{"kind":"sliding_window","roi":[100000,100000,100000]},
            "preprocess":{"normalization":{"kind":"window","lo":0,"hi":4000}}}"#,
    )
    .unwrap();
    let r = segment_with_budget(&[
        "--model",
        s(&foreign),
        "--input",
        s(&input),
        "--output",
        s(&out),
    ]);
    refused(&r, &["limits.memory_budget_mb", "model.roi", "one window"]);
    assert!(!out.exists());
}

#[test]
fn a_model_declaring_a_huge_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("huge.onnx");
    // Input [N, 1, 1e5, 1e5, 1e5], the manifest's roi the same.
    ok(&infl8(&[
        "example-model",
        "--out",
        s(&model),
        "--roi",
        "100000",
        "100000",
        "100000",
    ]));
    let out = dir.path().join("out.nii.gz");
    let r = segment_with_budget(&[
        "--model",
        s(&model),
        "--input",
        s(&t1_2mm()),
        "--output",
        s(&out),
    ]);
    refused(&r, &["limits.memory_budget_mb", "one window"]);
    assert!(!out.exists());
}

#[test]
fn a_tiny_target_spacing_is_checked_against_max_voxels() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 48);
    let out = dir.path().join("out.nii.gz");
    // Aborted with "memory allocation of 420032602080 bytes failed".
    let r = segment_with_budget(&[
        "--model",
        s(&model),
        "--input",
        s(&t1_2mm()),
        "--output",
        s(&out),
        "--spacing",
        "0.01",
        "0.01",
        "0.01",
    ]);
    let name = t1_2mm().file_name().unwrap().to_string_lossy().into_owned();
    let e = refused(&r, &["limits.max_voxels", "model.spacing", &name]);
    assert_eq!(r.status.code(), Some(1), "{e}");
    assert!(!out.exists());
    // Within max_voxels but not within the budget: the budget says so.
    let r = segment_with_budget(&[
        "--model",
        s(&model),
        "--input",
        s(&t1_2mm()),
        "--output",
        s(&out),
        "--max-voxels",
        "100000000000000",
        "--spacing",
        "0.01",
        "0.01",
        "0.01",
    ]);
    refused(&r, &["limits.memory_budget_mb"]);
    assert!(!out.exists());
}

/// A 1024 x 1024 x 512 u8 volume of zeros, gzip-compressed to a few MB.
fn dimension_bomb(path: &Path) {
    let raw = std::fs::read(t1_2mm()).unwrap();
    let mut header = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&raw[..]), &mut header).unwrap();
    header.truncate(352);
    let put16 =
        |h: &mut Vec<u8>, at: usize, v: i16| h[at..at + 2].copy_from_slice(&v.to_le_bytes());
    put16(&mut header, 40, 3);
    put16(&mut header, 42, 1024);
    put16(&mut header, 44, 1024);
    put16(&mut header, 46, 512);
    put16(&mut header, 70, 2); // datatype u8
    put16(&mut header, 72, 8); // bitpix
    header[108..112].copy_from_slice(&352f32.to_le_bytes()); // vox_offset
    header[112..116].copy_from_slice(&0f32.to_le_bytes()); // no scaling
    let mut gz = GzEncoder::new(std::fs::File::create(path).unwrap(), Compression::fast());
    gz.write_all(&header).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..512 {
        gz.write_all(&zeros).unwrap();
    }
    gz.finish().unwrap();
}

#[test]
fn a_small_gzip_declaring_half_a_billion_voxels_is_refused_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let bomb = dir.path().join("bomb.nii.gz");
    dimension_bomb(&bomb);
    // About 5 MB at the fastest level (522 KB at the best), for 512 MiB.
    let size = std::fs::metadata(&bomb).unwrap().len();
    assert!(size < 8 << 20, "{size} bytes");
    let model = example_model(dir.path(), 48);
    let out = dir.path().join("out.nii.gz");
    // No profile, no flags: the defaults refuse it from the header.
    let r = segment(&model, &bomb, &out, &[]);
    refused(
        &r,
        &["bomb.nii.gz", "536870912 voxels", "limits.max_voxels"],
    );
    assert!(!out.exists());
}

#[test]
fn bad_flags_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 48);
    let out = dir.path().join("out.nii.gz");
    let input = t1_2mm();
    let base = [
        "segment",
        "--model",
        s(&model),
        "--input",
        s(&input),
        "--output",
        s(&out),
    ];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        infl8(&args)
    };
    // Silently ignored before, while INFL8_MODEL__OVERLAP=NaN was refused.
    let r = with(&["--overlap", "NaN"]);
    refused(&r, &["--overlap", "not a finite number"]);
    let r = run_with_env(
        "infl8",
        &base,
        &[("INFL8_MODEL__OVERLAP", std::ffi::OsStr::new("NaN"))],
    );
    refused(&r, &["model.overlap"]);
    // Spent 89 s spawning threads before failing.
    let r = with(&["--threads", "100000"]);
    refused(&r, &["threads", "100000", "1024"]);
    // A report that is a folder fails before any output is written.
    let r = with(&["--report", s(dir.path())]);
    refused(&r, &["report", "is a folder"]);
    assert!(!out.exists());
}

#[test]
fn folder_mode_writes_the_good_volumes_and_reports_the_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 48);
    let inbox = dir.path().join("in");
    let outbox = dir.path().join("out");
    std::fs::create_dir_all(&inbox).unwrap();
    std::fs::copy(t1_2mm(), inbox.join("a.nii.gz")).unwrap();
    std::fs::copy(t1_2mm(), inbox.join("c.nii.gz")).unwrap();
    // A corrupt volume, named to inject a line into the log.
    let bytes = std::fs::read(t1_2mm()).unwrap();
    let evil = "b\nERROR forged line.nii.gz";
    std::fs::write(inbox.join(evil), &bytes[..bytes.len() / 2]).unwrap();
    let single = dir.path().join("single.nii.gz");
    ok(&segment(&model, &t1_2mm(), &single, &[]));
    let report = dir.path().join("report.json");
    let r = segment(&model, &inbox, &outbox, &["--report", s(&report)]);
    // Exit status 1 when any volume failed (README, "Bad input").
    let e = stderr(&r);
    assert_eq!(r.status.code(), Some(1), "{e}");
    assert!(e.contains("1 of 3 volumes failed"), "{e}");
    // The name is escaped: no line of the log starts with the forged text.
    assert!(
        !e.lines().any(|l| l.starts_with("ERROR forged")),
        "a file name injected a log line:\n{e}"
    );
    assert!(e.contains("b\\nERROR forged line.nii.gz"), "{e}");
    // The good volumes: written, and the same labels as a single run.
    let want = nifti_io::read_volume(&single, &ReadLimits::default()).unwrap();
    for name in ["a.nii.gz", "c.nii.gz"] {
        let got = nifti_io::read_volume(&outbox.join(name), &ReadLimits::default()).unwrap();
        assert_eq!(got.data, want.data, "{name}");
        assert_eq!(got.affine, want.affine, "{name}");
    }
    assert!(!outbox.join(evil).exists());
    assert_eq!(std::fs::read_dir(&outbox).unwrap().count(), 2);
    // The report lists all three, the failure with its reason.
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let entries = v.as_array().unwrap();
    assert_eq!(entries.len(), 3, "{v:#}");
    let failed: Vec<_> = entries
        .iter()
        .filter(|e| e.get("error").is_some())
        .collect();
    assert_eq!(failed.len(), 1, "{v:#}");
    assert!(failed[0]["input"].as_str().unwrap().ends_with(evil));
    assert!(
        failed[0]["error"].as_str().unwrap().contains("truncated"),
        "{v:#}"
    );
    for ok_entry in entries.iter().filter(|e| e.get("error").is_none()) {
        assert!(ok_entry["windows"].as_u64().unwrap() > 0, "{v:#}");
    }
}
