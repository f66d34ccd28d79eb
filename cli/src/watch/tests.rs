//! The service against a fake worker: a crash after every step, then a
//! restart, must end with exactly one complete result per input.

use super::*;

/// Writes a fake segmentation and report (as the real worker does: output,
/// then report, each atomically); inputs named `bad*` fail.
#[derive(Default)]
struct FakeRunner {
    runs: u32,
    /// Die like a killed worker: a temporary file left, nothing recorded.
    crash_mid_write: bool,
}

impl Runner for FakeRunner {
    fn run(&mut self, job: &WorkerJob, _stopping: &dyn Fn() -> bool) -> RunResult {
        self.runs += 1;
        if job.name.starts_with("bad") {
            return RunResult::Failed {
                kind: "error",
                reason: format!("{}: corrupt gzip stream", job.input.display()),
            };
        }
        if self.crash_mid_write {
            let dir = job.output.parent().unwrap();
            let name = job.output.file_name().unwrap().to_string_lossy();
            fs::write(dir.join(format!(".{name}.999-0.infl8-tmp")), b"half").unwrap();
            return RunResult::Service("simulated crash mid-write".into());
        }
        write_atomic(&job.output, job.sha256.as_bytes()).unwrap();
        let report = json!({"input": job.name, "input_sha256": job.sha256, "attempt": job.attempt});
        write_atomic(&job.report, report.to_string().as_bytes()).unwrap();
        RunResult::Ok
    }
}

struct Dirs {
    _tmp: tempfile::TempDir,
    inbox: PathBuf,
    outbox: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().unwrap();
    let inbox = tmp.path().join("in");
    let outbox = tmp.path().join("out");
    fs::create_dir_all(&inbox).unwrap();
    Dirs {
        inbox,
        outbox,
        _tmp: tmp,
    }
}

fn service(d: &Dirs, move_inputs: bool, runner: FakeRunner) -> Service<FakeRunner> {
    Service::open(Options {
        inbox: d.inbox.clone(),
        outbox: d.outbox.clone(),
        watch: WatchSettings {
            stable_secs: 0.0,
            poll_ms: 1,
            move_inputs,
            max_attempts: 3,
        },
        model: "m.onnx".into(),
        model_sha256: "00".into(),
        runner,
        stop: Arc::new(AtomicBool::new(false)),
    })
    .unwrap()
}

/// What `run` does, without waiting for more input.
fn drain(s: &mut Service<FakeRunner>) -> Result<()> {
    s.recover()?;
    while s.step()? {}
    Ok(())
}

fn records(d: &Dirs) -> Vec<Record> {
    Journal::open(&d.outbox.join(".infl8/journal.jsonl"))
        .unwrap()
        .1
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn count(recs: &[Record], f: impl Fn(&Record) -> bool) -> usize {
    recs.iter().filter(|r| f(r)).count()
}

#[test]
fn a_crash_after_any_step_ends_in_exactly_one_result() {
    for step in ["taken", "mid-write", "ran", "done", "moved"] {
        let d = dirs();
        fs::write(d.inbox.join("good.nii.gz"), b"good bytes").unwrap();
        let mut s = service(
            &d,
            true,
            FakeRunner {
                crash_mid_write: step == "mid-write",
                ..FakeRunner::default()
            },
        );
        s.crash_at = Some(step);
        assert!(drain(&mut s).is_err(), "{step}: the crash must happen");
        drop(s);

        let mut s = service(&d, true, FakeRunner::default());
        drain(&mut s).unwrap();
        let reruns = s.o.runner.runs;
        match step {
            // The results were complete before the crash: not run again.
            "ran" | "done" | "moved" => assert_eq!(reruns, 0, "{step}"),
            _ => assert_eq!(reruns, 1, "{step}"),
        }
        assert_eq!(
            names(&d.outbox),
            [
                ".infl8",
                "done",
                "failed",
                "good.report.json",
                "good_seg.nii.gz"
            ],
            "{step}"
        );
        assert_eq!(names(&d.outbox.join("done")), ["good.nii.gz"], "{step}");
        assert!(names(&d.outbox.join("failed")).is_empty(), "{step}");
        assert!(names(&d.inbox).is_empty(), "{step}");
        let recs = records(&d);
        assert_eq!(
            count(&recs, |r| matches!(r, Record::Done { .. })),
            1,
            "{step}"
        );
        assert_eq!(
            count(&recs, |r| matches!(r, Record::Failed { .. })),
            0,
            "{step}"
        );
        // A third start has nothing to do.
        drop(s);
        let mut s = service(&d, true, FakeRunner::default());
        drain(&mut s).unwrap();
        assert_eq!(s.o.runner.runs, 0);
        assert_eq!(records(&d).len(), recs.len());
    }
}

#[test]
fn a_crash_while_failing_a_poison_input_ends_in_one_failure_record() {
    for step in ["taken", "ran", "error-report", "failed", "moved"] {
        let d = dirs();
        fs::write(d.inbox.join("bad.nii.gz"), b"garbage").unwrap();
        let mut s = service(&d, true, FakeRunner::default());
        s.crash_at = Some(step);
        assert!(drain(&mut s).is_err(), "{step}");
        drop(s);
        let mut s = service(&d, true, FakeRunner::default());
        drain(&mut s).unwrap();
        assert_eq!(
            names(&d.outbox.join("failed")),
            ["bad.nii.gz", "bad.nii.gz.error.json"],
            "{step}"
        );
        assert_eq!(names(&d.outbox), [".infl8", "done", "failed"], "{step}");
        assert!(names(&d.inbox).is_empty(), "{step}");
        let recs = records(&d);
        assert_eq!(
            count(&recs, |r| matches!(r, Record::Failed { .. })),
            1,
            "{step}"
        );
        assert_eq!(
            count(&recs, |r| matches!(r, Record::Done { .. })),
            0,
            "{step}"
        );
        let err: Value = serde_json::from_str(
            &fs::read_to_string(d.outbox.join("failed/bad.nii.gz.error.json")).unwrap(),
        )
        .unwrap();
        assert!(err["error"].as_str().unwrap().contains("corrupt"), "{err}");
    }
}

#[test]
fn an_input_the_service_keeps_dying_on_becomes_poison() {
    let d = dirs();
    fs::write(d.inbox.join("kills.nii.gz"), b"x").unwrap();
    for attempt in 1..=3 {
        let mut s = service(&d, true, FakeRunner::default());
        s.crash_at = Some("taken");
        assert!(drain(&mut s).is_err(), "attempt {attempt}");
    }
    let mut s = service(&d, true, FakeRunner::default());
    drain(&mut s).unwrap();
    assert_eq!(s.o.runner.runs, 0);
    let err: Value = serde_json::from_str(
        &fs::read_to_string(d.outbox.join("failed/kills.nii.gz.error.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(err["kind"], "crashed");
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("watch.max_attempts"),
        "{err}"
    );
    let recs = records(&d);
    assert_eq!(count(&recs, |r| matches!(r, Record::Taken { .. })), 3);
}

#[test]
fn inputs_left_in_place_are_not_processed_again_but_new_content_is() {
    let d = dirs();
    fs::write(d.inbox.join("a.nii.gz"), b"first").unwrap();
    fs::write(d.inbox.join("b.nii"), b"second").unwrap();
    fs::write(d.inbox.join("c.nii.gz.part"), b"still arriving").unwrap();
    fs::write(d.inbox.join(".hidden.nii.gz"), b"dotfile").unwrap();
    fs::write(d.inbox.join("notes.txt"), b"not an image").unwrap();
    let mut s = service(&d, false, FakeRunner::default());
    drain(&mut s).unwrap();
    assert_eq!(s.o.runner.runs, 2);
    assert_eq!(s.state.counts(), (2, 1));
    drain(&mut s).unwrap();
    drop(s);
    let mut s = service(&d, false, FakeRunner::default());
    drain(&mut s).unwrap();
    assert_eq!(s.o.runner.runs, 0, "nothing is processed twice");
    assert_eq!(names(&d.inbox).len(), 5, "inputs stay where they are");
    assert!(d.outbox.join("failed/notes.txt.error.json").is_file());

    // A new file under an old name is a new input, with its own results.
    fs::write(d.inbox.join("a.nii.gz"), b"replaced").unwrap();
    drain(&mut s).unwrap();
    assert_eq!(s.o.runner.runs, 1);
    let sha = sha256_file(&d.inbox.join("a.nii.gz")).unwrap();
    let slot = format!("a-{}", &sha[..12]);
    assert!(d.outbox.join(format!("{slot}_seg.nii.gz")).is_file());
    assert!(d.outbox.join("a_seg.nii.gz").is_file());
    let status: Status =
        serde_json::from_str(&fs::read_to_string(d.outbox.join(".infl8/status.json")).unwrap())
            .unwrap();
    assert_eq!((status.done, status.failed, status.queue), (3, 1, 0));
}

#[test]
fn a_second_service_on_one_outbox_is_refused() {
    let d = dirs();
    let _first = service(&d, true, FakeRunner::default());
    let e = Service::open(Options {
        inbox: d.inbox.clone(),
        outbox: d.outbox.clone(),
        watch: WatchSettings::default(),
        model: "m.onnx".into(),
        model_sha256: "00".into(),
        runner: FakeRunner::default(),
        stop: Arc::new(AtomicBool::new(false)),
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("another infl8 watch"), "{e}");
}

#[test]
fn rfc3339_dates_are_civil() {
    let t = now_rfc3339();
    assert_eq!(t.len(), 24, "{t}");
    assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
}
