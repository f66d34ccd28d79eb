//! `infl8 watch` on the default CPU backend (the tract plugin) and a real
//! scan: the service's worker must produce exactly what `infl8 segment`
//! produces for the same input, model and settings. (The soak test drives
//! the service's bookkeeping with a fault-injecting test backend; this one
//! checks the real path.)

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use infl8_core::nifti_io::{self, ReadLimits};
use infl8_suite::{example_model, infl8, ok, plugin_profile, s, segment, small_volumes, t1_2mm};
use serde_json::Value;

#[test]
fn watch_segments_a_real_scan_as_segment_does() {
    let dir = tempfile::tempdir().unwrap();
    let (inbox, outbox) = (dir.path().join("inbox"), dir.path().join("outbox"));
    fs::create_dir_all(&inbox).unwrap();
    let model = example_model(dir.path(), 32);
    let input = t1_2mm();

    let direct = dir.path().join("direct_seg.nii.gz");
    ok(&segment(&model, &input, &direct, &[]));

    let mut child = infl8_suite::command("infl8")
        .args([
            "watch",
            "--inbox",
            s(&inbox),
            "--outbox",
            s(&outbox),
            "--model",
            s(&model),
        ])
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

// ------------------------------------------------------------ hostile input

/// A running `infl8 watch`, its log in a file; killed when dropped.
struct Watch {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Watch {
    fn start(root: &Path, tag: &str, args: &[&str]) -> Watch {
        let log = root.join(format!("{tag}.log"));
        let file = fs::File::create(&log).unwrap();
        let mut cmd = infl8_suite::command("infl8");
        cmd.arg("watch")
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        Watch {
            child: cmd.spawn().expect("start infl8 watch"),
            log,
        }
    }

    /// `infl8 watch --inbox --outbox --model --config` (a profile).
    fn with_profile(
        root: &Path,
        tag: &str,
        inbox: &Path,
        outbox: &Path,
        model: &Path,
        config: &Path,
    ) -> Watch {
        let args = [
            "--inbox",
            s(inbox),
            "--outbox",
            s(outbox),
            "--model",
            s(model),
            "--config",
            s(config),
        ];
        Watch::start(root, tag, &args)
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for `done` (failing with the log past `within`, or when the
    /// service exits).
    fn wait_for(&mut self, within: Duration, what: &str, done: impl Fn() -> bool) {
        let until = Instant::now() + within;
        while !done() {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!(
                    "infl8 watch exited with {st} waiting for {what}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < until,
                "no {what} within {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM; the exit status, within `within`.
    fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        // SAFETY: kill on our own child's pid.
        unsafe { kill(self.child.id() as i32, 15) };
        let until = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < until,
                "infl8 watch did not stop within {within:?} of SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// Delivered as a sender would: under `.part`, then renamed.
fn deliver(inbox: &Path, name: &str, bytes: &[u8]) {
    let part = inbox.join(format!("{name}.part"));
    fs::write(&part, bytes).unwrap();
    fs::rename(&part, inbox.join(name)).unwrap();
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn journal_events(outbox: &Path, event: &str) -> Vec<String> {
    fs::read_to_string(outbox.join(".infl8/journal.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == event)
        .map(|v| v["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn a_hanging_and_an_aborting_plugin_fail_their_inputs_and_the_service_goes_on() {
    for (backend, kind) in [("crash-hang", "timeout"), ("crash-abort", "crashed")] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (inbox, outbox) = (root.join("in"), root.join("out"));
        fs::create_dir_all(&inbox).unwrap();
        let model = example_model(root, 16);
        let config = plugin_profile(root, "infl8test_crashing", backend, "timeout_s = 1");
        let mut w = Watch::with_profile(root, backend, &inbox, &outbox, &model, &config);
        let vols = small_volumes(2);
        deliver(&inbox, "a.nii.gz", &vols[0]);
        deliver(&inbox, "b.nii.gz", &vols[1]);
        let failed = outbox.join("failed");
        w.wait_for(Duration::from_secs(60), "two failures", || {
            dir_names(&failed).len() == 4
        });
        for name in ["a", "b"] {
            let e: Value = serde_json::from_str(
                &fs::read_to_string(failed.join(format!("{name}.nii.gz.error.json"))).unwrap(),
            )
            .unwrap();
            assert_eq!(e["kind"], kind, "{backend}: {e}");
        }
        assert!(dir_names(&inbox).is_empty());
        let st = w.terminate(Duration::from_secs(10));
        assert!(st.success(), "{backend}: {st}\n{}", w.log());
    }
}

/// SIGTERM is honoured within `watch.stop_grace_s` (2 s by default) even
/// while a plugin hangs in a volume: the worker is killed, the input stays
/// in the inbox for the next start, journalled as deferred, not failed.
#[test]
fn sigterm_stops_the_service_within_its_grace_even_during_a_hung_volume() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (inbox, outbox) = (root.join("in"), root.join("out"));
    fs::create_dir_all(&inbox).unwrap();
    let model = example_model(root, 16);
    let config = plugin_profile(root, "infl8test_crashing", "crash-hang", "timeout_s = 600");
    let mut w = Watch::with_profile(root, "stop", &inbox, &outbox, &model, &config);
    deliver(&inbox, "a.nii.gz", &small_volumes(1)[0]);
    w.wait_for(Duration::from_secs(60), "the volume to be taken", || {
        !journal_events(&outbox, "taken").is_empty()
    });
    // Into the hang.
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let st = w.terminate(Duration::from_secs(20));
    let took = t.elapsed();
    assert!(st.success(), "{st}\n{}", w.log());
    assert!(took < Duration::from_secs(6), "stopped after {took:?}");
    assert_eq!(dir_names(&inbox), ["a.nii.gz"], "left for the next start");
    assert_eq!(journal_events(&outbox, "deferred"), ["a.nii.gz"]);
    assert!(dir_names(&outbox.join("failed")).is_empty());
}

#[test]
fn a_model_that_cannot_load_stops_the_service_at_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (inbox, outbox) = (dir.path().join("in"), dir.path().join("out"));
    fs::create_dir_all(&inbox).unwrap();
    let model = dir.path().join("broken.onnx");
    fs::write(&model, b"not an onnx model").unwrap();
    let out = infl8(&[
        "watch",
        "--inbox",
        s(&inbox),
        "--outbox",
        s(&outbox),
        "--model",
        s(&model),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.onnx"), "{err}");
}

#[test]
fn two_services_on_one_inbox_process_each_file_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let inbox = root.join("in");
    fs::create_dir_all(&inbox).unwrap();
    let model = example_model(root, 16);
    let config = plugin_profile(root, "infl8test_faulty", "faulty-marker", "");
    let outboxes = [root.join("out1"), root.join("out2")];
    let mut services: Vec<Watch> = outboxes
        .iter()
        .enumerate()
        .map(|(i, o)| Watch::with_profile(root, &format!("w{i}"), &inbox, o, &model, &config))
        .collect();
    // Both must be watching before the files arrive.
    for (w, o) in services.iter_mut().zip(&outboxes) {
        let status = o.join(".infl8/status.json");
        w.wait_for(Duration::from_secs(60), "the service to start", || {
            status.is_file()
        });
    }
    let vols = small_volumes(8);
    let names: Vec<String> = (0..vols.len()).map(|i| format!("v{i}.nii.gz")).collect();
    for (n, v) in names.iter().zip(&vols) {
        deliver(&inbox, n, v);
    }
    let done = || {
        outboxes
            .iter()
            .map(|o| journal_events(o, "done").len())
            .sum::<usize>()
    };
    let until = Instant::now() + Duration::from_secs(120);
    while done() < names.len() || !dir_names(&inbox).is_empty() {
        assert!(
            Instant::now() < until,
            "not all done: {:?} {:?}\n{}\n{}",
            journal_events(&outboxes[0], "done"),
            journal_events(&outboxes[1], "done"),
            services[0].log(),
            services[1].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Both had a chance at every file; give a late duplicate time to show.
    std::thread::sleep(Duration::from_secs(1));
    for w in &mut services {
        assert!(w.terminate(Duration::from_secs(30)).success());
    }
    let mut all: Vec<String> = outboxes
        .iter()
        .flat_map(|o| journal_events(o, "taken"))
        .collect();
    all.sort();
    assert_eq!(all, names, "each file taken by exactly one service");
}

#[test]
fn a_read_only_outbox_keeps_the_input_until_it_can_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (inbox, outbox) = (root.join("in"), root.join("out"));
    fs::create_dir_all(&inbox).unwrap();
    fs::create_dir_all(&outbox).unwrap();
    // Immutable: no new file in it, for root too (EPERM).
    let immutable = |on: bool| {
        Command::new("chattr")
            .arg(if on { "+i" } else { "-i" })
            .arg(&outbox)
            .status()
            .is_ok_and(|s| s.success())
    };
    let model = example_model(root, 16);
    let config = plugin_profile(root, "infl8test_faulty", "faulty-marker", "");
    let mut w = Watch::with_profile(root, "ro", &inbox, &outbox, &model, &config);
    let status = outbox.join(".infl8/status.json");
    w.wait_for(Duration::from_secs(60), "the service to start", || {
        status.is_file()
    });
    assert!(
        immutable(true),
        "chattr +i {} (root, on a file system with attributes) is needed",
        outbox.display()
    );
    let vols = small_volumes(1);
    deliver(&inbox, "scan.nii.gz", &vols[0]);
    let deferred = || journal_events(&outbox, "deferred").len() >= 2;
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        w.wait_for(Duration::from_secs(60), "two deferrals", deferred)
    }));
    assert!(immutable(false));
    if let Err(p) = waited {
        std::panic::resume_unwind(p);
    }
    assert!(
        dir_names(&outbox.join("failed")).is_empty(),
        "never poisoned"
    );
    w.wait_for(Duration::from_secs(60), "the result", || {
        outbox.join("done/scan.nii.gz").is_file()
    });
    assert!(outbox.join("scan_seg.nii.gz").is_file());
    assert!(
        w.log().contains("cannot write its results now"),
        "{}",
        w.log()
    );
    assert!(w.terminate(Duration::from_secs(30)).success());
}
