//! `infl8 watch` on the default CPU backend (the tract plugin) and a real
//! scan: the service's worker must produce exactly what `infl8 segment`
//! produces for the same input, model and settings. (The soak test drives
//! the service's bookkeeping with a fault-injecting test backend; this one
//! checks the real path.)

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use infl8_core::nifti_io::{self, ReadLimits};
use infl8_suite::{bin, example_model, infl8, ok, s, t1_2mm};
use serde_json::Value;

#[test]
fn watch_segments_a_real_scan_as_segment_does() {
    let dir = tempfile::tempdir().unwrap();
    let (inbox, outbox) = (dir.path().join("inbox"), dir.path().join("outbox"));
    fs::create_dir_all(&inbox).unwrap();
    let model = example_model(dir.path(), 32);
    let input = t1_2mm();

    let direct = dir.path().join("direct_seg.nii.gz");
    ok(&infl8(&[
        "segment",
        "--model",
        s(&model),
        "--input",
        s(&input),
        "--output",
        s(&direct),
    ]));

    let mut child = Command::new(bin("infl8"))
        .args([
            "watch",
            "--inbox",
            s(&inbox),
            "--outbox",
            s(&outbox),
            "--model",
            s(&model),
        ])
        .env_remove("INFL8_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start infl8 watch");
    // Delivered as a sender would: under `.part`, then renamed.
    let part = inbox.join("t1.nii.gz.part");
    fs::copy(&input, &part).unwrap();
    fs::rename(&part, inbox.join("t1.nii.gz")).unwrap();

    let report_path = outbox.join("t1.report.json");
    let until = Instant::now() + Duration::from_secs(120);
    while !outbox.join("done/t1.nii.gz").is_file() {
        if let Some(st) = child.try_wait().unwrap() {
            let err = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
            panic!("infl8 watch exited with {st}:\n{err}");
        }
        if Instant::now() > until {
            let _ = child.kill();
            let err = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
            panic!("no result within 120 s:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(term.success());
    let st = child.wait().unwrap();
    assert!(st.success(), "SIGTERM: {st}");

    let report: Value = serde_json::from_str(&fs::read_to_string(&report_path).unwrap()).unwrap();
    assert_eq!(report["backend"], "tract", "{report}");
    assert_eq!(report["input"], "t1.nii.gz", "{report}");
    let limits = ReadLimits::default();
    let watched = nifti_io::read_volume(&outbox.join("t1_seg.nii.gz"), &limits).unwrap();
    let direct = nifti_io::read_volume(&direct, &limits).unwrap();
    assert_eq!(watched.dims(), direct.dims());
    assert_eq!(watched.affine, direct.affine);
    assert!(
        watched.data.iter().any(|&l| l != 0.0),
        "the watched label map is empty"
    );
    assert_eq!(watched.data, direct.data, "watch and segment disagree");
}
