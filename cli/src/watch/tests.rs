//! The service against a fake worker: a crash after every step, then a
//! restart, must end with exactly one complete result per input.

use super::*;
use crate::watch::worker::journal_kind;
use crate::watch::{now_rfc3339, sha256_file};
use infl8_core::failure::FailureKind;
use sha2::{Digest, Sha256};

/// The checksum of a file, as the service computes it.
fn sha_of(p: &Path) -> String {
    sha256_file(p, &|| false).unwrap().unwrap()
}

/// Writes a fake segmentation and report (as the real worker does: output,
/// then report, each atomically); inputs named `bad*` fail.
#[derive(Default)]
struct FakeRunner {
    runs: u32,
    /// Die like a killed worker: a temporary file left, nothing recorded.
    crash_mid_write: bool,
    /// Be killed like a worker past its timeout: temporary files left.
    time_out: bool,
    /// A SIGTERM while this run is in progress: set once it is done.
    stop_after_run: Option<Arc<AtomicBool>>,
    /// Runs that find the outbox full before the outbox is fixed.
    full_disk: u32,
    /// Runs during which a slow writer appends to the input, which the
    /// worker then finds truncated.
    slow_writer: u32,
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
        if self.slow_writer > 0 {
            self.slow_writer -= 1;
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(&job.input)
                .unwrap();
            std::io::Write::write_all(&mut f, b" and the rest").unwrap();
            return RunResult::Failed {
                kind: "error",
                reason: format!("{}: truncated: unexpected end of file", job.input.display()),
            };
        }
        if self.full_disk > 0 {
            self.full_disk -= 1;
            return RunResult::Transient(format!(
                "{}: cannot write: No space left on device (os error 28)",
                job.output.display()
            ));
        }
        if self.time_out {
            for p in [&job.output, &job.report] {
                let dir = p.parent().unwrap();
                let name = p.file_name().unwrap().to_string_lossy();
                fs::write(dir.join(format!(".{name}.999-0.infl8-tmp")), b"half").unwrap();
            }
            return RunResult::Failed {
                kind: "timeout",
                reason: format!("{}: timed out", job.input.display()),
            };
        }
        if self.crash_mid_write {
            let dir = job.output.parent().unwrap();
            let name = job.output.file_name().unwrap().to_string_lossy();
            fs::write(dir.join(format!(".{name}.999-0.infl8-tmp")), b"half").unwrap();
            return RunResult::Service("simulated crash mid-write".into());
        }
        fsio::write_atomic(&job.output, job.sha256.as_bytes()).unwrap();
        let report = json!({"input": job.name, "input_sha256": job.sha256, "attempt": job.attempt});
        fsio::write_atomic(&job.report, report.to_string().as_bytes()).unwrap();
        if let Some(stop) = &self.stop_after_run {
            stop.store(true, Ordering::SeqCst);
        }
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
    service_with(d, 0.0, move_inputs, runner)
}

fn service_with(
    d: &Dirs,
    stable_secs: f64,
    move_inputs: bool,
    runner: FakeRunner,
) -> Service<FakeRunner> {
    Service::open(Options {
        inbox: d.inbox.clone(),
        outbox: d.outbox.clone(),
        watch: WatchSettings {
            stable_secs,
            poll_ms: 1,
            move_inputs,
            max_attempts: 3,
            stop_grace_s: 2.0,
        },
        model: "m.onnx".into(),
        model_sha256: "00".into(),
        runner,
        stop: Arc::new(AtomicBool::new(false)),
        retry_failed: false,
        max_input_bytes: 0,
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
    let sha = sha_of(&d.inbox.join("a.nii.gz"));
    let slot = format!("a-{}", &sha[..12]);
    assert!(d.outbox.join(format!("{slot}_seg.nii.gz")).is_file());
    assert!(d.outbox.join("a_seg.nii.gz").is_file());
    let status: Status =
        serde_json::from_str(&fs::read_to_string(d.outbox.join(".infl8/status.json")).unwrap())
            .unwrap();
    assert_eq!((status.done, status.failed, status.queue), (3, 1, 0));
}

#[test]
fn a_stop_right_after_the_last_volume_leaves_an_empty_queue_in_the_status() {
    let d = dirs();
    fs::write(d.inbox.join("a.nii.gz"), b"only").unwrap();
    let mut s = service(&d, true, FakeRunner::default());
    s.o.runner.stop_after_run = Some(s.o.stop.clone());
    // One scan counts a.nii.gz as queued, processes it, and the stop
    // comes before another scan.
    s.run().unwrap();
    assert_eq!(s.o.runner.runs, 1);
    let status: Status =
        serde_json::from_str(&fs::read_to_string(d.outbox.join(".infl8/status.json")).unwrap())
            .unwrap();
    assert_eq!(status.state, "stopped");
    assert_eq!((status.done, status.queue), (1, 0));
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
        retry_failed: false,
        max_input_bytes: 0,
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("another infl8 watch"), "{e}");
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Steps until nothing is left to do; a step that keeps finding work (a
/// loop that spins) fails the test instead of hanging it.
fn drain_bounded(s: &mut Service<FakeRunner>, max_steps: usize) {
    s.recover().unwrap();
    for _ in 0..max_steps {
        if !s.step().unwrap() {
            return;
        }
    }
    panic!("still busy after {max_steps} steps: the scan loop spins");
}

#[test]
fn complete_results_on_the_last_allowed_attempt_are_recorded_not_failed() {
    let d = dirs();
    fs::write(d.inbox.join("good.nii.gz"), b"good bytes").unwrap();
    // Two deaths before the worker ran, then one after it wrote everything:
    // the third (last allowed) attempt's results are complete.
    for step in ["taken", "taken", "ran"] {
        let mut s = service(&d, true, FakeRunner::default());
        s.crash_at = Some(step);
        assert!(drain(&mut s).is_err(), "{step}");
    }
    let mut s = service(&d, true, FakeRunner::default());
    drain(&mut s).unwrap();
    assert_eq!(s.o.runner.runs, 0);
    let recs = records(&d);
    assert_eq!(count(&recs, |r| matches!(r, Record::Done { .. })), 1);
    assert_eq!(count(&recs, |r| matches!(r, Record::Failed { .. })), 0);
    assert!(names(&d.outbox.join("failed")).is_empty());
    assert_eq!(names(&d.outbox.join("done")), ["good.nii.gz"]);
}

#[test]
fn a_killed_workers_temporary_files_go_at_once() {
    let d = dirs();
    fs::write(d.inbox.join("slow.nii.gz"), b"slow").unwrap();
    fs::write(d.inbox.join("next.nii.gz"), b"next").unwrap();
    let mut s = service(
        &d,
        true,
        FakeRunner {
            time_out: true,
            ..FakeRunner::default()
        },
    );
    drain(&mut s).unwrap();
    // No restart in between: the running service cleaned up after itself.
    assert_eq!(names(&d.outbox), [".infl8", "done", "failed"]);
    assert_eq!(
        names(&d.outbox.join("failed")),
        [
            "next.nii.gz",
            "next.nii.gz.error.json",
            "slow.nii.gz",
            "slow.nii.gz.error.json"
        ]
    );
}

#[test]
fn an_unreadable_file_neither_spins_nor_holds_up_the_others() {
    let d = dirs();
    // Oldest first: the unreadable file is the first candidate of each scan.
    fs::write(d.inbox.join("locked.nii.gz"), b"locked").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    fs::write(d.inbox.join("fine.nii.gz"), b"fine").unwrap();
    let mut s = service(&d, true, FakeRunner::default());
    // Root reads any file, so unreadability is faked at the checksum.
    s.hash = |p, r, stop| {
        if p.ends_with("locked.nii.gz") {
            bail!("{}: permission denied", p.display())
        }
        sha256_of(p, r, stop)
    };
    drain_bounded(&mut s, 10);
    assert_eq!(s.o.runner.runs, 1);
    assert_eq!(names(&d.outbox.join("done")), ["fine.nii.gz"]);
    assert_eq!(names(&d.inbox), ["locked.nii.gz"], "left for a later try");
    // Changed, it is tried again at once.
    fs::write(d.inbox.join("locked.nii.gz"), b"now readable").unwrap();
    s.hash = sha256_of;
    drain_bounded(&mut s, 10);
    assert_eq!(s.o.runner.runs, 2);
    assert!(names(&d.inbox).is_empty());
}

#[test]
fn a_name_that_is_not_utf8_is_left_alone_and_the_rest_flows() {
    use std::os::unix::ffi::OsStrExt;
    let d = dirs();
    let raw = std::ffi::OsStr::from_bytes(b"scan-\xff.nii.gz");
    fs::write(d.inbox.join(raw), b"latin-1 name").unwrap();
    fs::write(d.inbox.join("ok.nii.gz"), b"ok").unwrap();
    let mut s = service(&d, true, FakeRunner::default());
    drain_bounded(&mut s, 10);
    assert_eq!(s.o.runner.runs, 1);
    assert_eq!(names(&d.outbox.join("done")), ["ok.nii.gz"]);
    assert!(d.inbox.join(raw).is_file(), "not moved, not lost");
    assert_eq!(records(&d).len(), 2, "taken + done of ok.nii.gz only");
}

#[test]
fn a_file_renamed_from_part_is_taken_without_the_stability_wait() {
    let d = dirs();
    // An hour of stability would never pass in this test.
    let mut s = service_with(&d, 3600.0, true, FakeRunner::default());
    fs::write(d.inbox.join("a.nii.gz.part"), b"arriving").unwrap();
    fs::write(d.inbox.join("b.nii.gz.part"), b"arriving too").unwrap();
    fs::write(d.inbox.join("plain.nii.gz"), b"no part").unwrap();
    drain_bounded(&mut s, 10);
    assert_eq!(s.o.runner.runs, 0);
    fs::rename(d.inbox.join("a.nii.gz.part"), d.inbox.join("a.nii.gz")).unwrap();
    fs::rename(d.inbox.join("b.nii.gz.part"), d.inbox.join("b.nii.gz")).unwrap();
    drain_bounded(&mut s, 10);
    assert_eq!(s.o.runner.runs, 2, "both renamed files, in one scan");
    assert_eq!(
        names(&d.inbox),
        ["plain.nii.gz"],
        "still waiting to be stable"
    );
}

#[test]
fn a_new_file_that_looks_like_a_finished_one_is_still_processed() {
    let d = dirs();
    let path = d.inbox.join("a.nii.gz");
    fs::write(&path, b"AAAA").unwrap();
    let mtime = fs::metadata(&path).unwrap().modified().unwrap();
    let mut s = service(&d, true, FakeRunner::default());
    // Done, and the service dies before the move.
    s.crash_at = Some("done");
    assert!(drain(&mut s).is_err());
    drop(s);
    // Meanwhile a new scan replaces it: same name, size and mtime.
    fs::write(&path, b"BBBB").unwrap();
    fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let mut s = service(&d, true, FakeRunner::default());
    drain_bounded(&mut s, 10);
    assert_eq!(s.o.runner.runs, 1, "the new bytes are segmented");
    let recs = records(&d);
    assert_eq!(count(&recs, |r| matches!(r, Record::Done { .. })), 2);
    let sha = sha_of(
        &d.outbox
            .join("done")
            .join(format!("a-{}.nii.gz", &sha256_hex(b"BBBB")[..12])),
    );
    assert_eq!(
        sha,
        sha256_hex(b"BBBB"),
        "the new bytes, filed under their own slot"
    );
    assert!(
        d.outbox.join("a_seg.nii.gz").is_file(),
        "the first input's results stay"
    );
}

#[test]
fn rfc3339_dates_are_civil() {
    let t = now_rfc3339();
    assert_eq!(t.len(), 24, "{t}");
    assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
}

#[test]
fn failure_kinds_come_from_the_error_s_type_not_its_words() {
    use infl8_core::engine::TimedOut;
    use infl8_core::nifti_io::NiftiIoError;
    let said = |e: anyhow::Error| json!({"error": crate::error_chain(&e), "kind": FailureKind::of_chain(e.chain())});
    let too_large = anyhow::Error::new(NiftiIoError::InputBytes {
        path: "x.nii".into(),
        what: "file",
        bytes: 2000,
        max: 1000,
    })
    .context("while reading");
    assert_eq!(journal_kind(Some(&said(too_large))), "limit");
    let timed_out = anyhow::Error::new(TimedOut {
        path: "x.nii".into(),
        limit_s: 5.0,
    });
    assert_eq!(journal_kind(Some(&said(timed_out))), "timeout");
    // Words that once meant a limit do not make one.
    let words = anyhow::anyhow!("x.nii: see limits.max_voxels and NaN or infinite");
    assert_eq!(journal_kind(Some(&said(words))), "error");
    assert_eq!(journal_kind(None), "error");
}

/// The example unit in packaging/systemd must keep working: its ExecStart
/// is parsed by this binary's own command line, and the README shows the
/// same directives.
#[test]
fn the_example_systemd_unit_runs_a_command_line_infl8_watch_accepts() {
    use clap::Parser;
    const UNIT: &str = include_str!("../../../packaging/systemd/infl8-watch.service");
    const README: &str = include_str!("../../../README.md");
    let exec = UNIT
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart line");
    // systemd splits on whitespace like this only without its quoting.
    assert!(!exec.contains(['"', '\'', '\\', '$']), "{exec}");
    let argv: Vec<&str> = exec.split_whitespace().collect();
    assert!(argv[0].ends_with("/infl8"), "{exec}");
    let cli = crate::Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{exec}\n{e}"));
    let crate::Command::Watch(a) = cli.command else {
        panic!("not an `infl8 watch` command: {exec}");
    };
    assert!(!a.status && a.worker_job.is_none(), "{exec}");
    assert!(a.inbox.is_some() && a.model.is_some(), "{exec}");
    assert!(
        a.runtime.config.is_some(),
        "the unit names its profile: {exec}"
    );
    assert!(
        a.inbox
            .as_deref()
            .is_some_and(|i| !i.starts_with(&a.outbox)),
        "{exec}"
    );

    let block = README
        .split("```ini\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the README shows the unit in an ini block");
    let mut directives = 0;
    for line in block
        .lines()
        .filter(|l| l.contains('=') && !l.starts_with('#'))
    {
        directives += 1;
        assert!(
            UNIT.lines().any(|u| u == line),
            "the README's unit has `{line}`, packaging/systemd/infl8-watch.service does not"
        );
    }
    assert!(directives >= 10, "{block}");
    assert!(block.contains(&format!("ExecStart={exec}\n")));
}

#[test]
fn the_longest_legal_names_are_processed_and_filed_under_names_that_fit() {
    let d = dirs();
    // 255 bytes in all, the longest a file system allows.
    let good = format!("{}.nii.gz", "N".repeat(248));
    let bad = format!("bad{}.nii", "B".repeat(248));
    assert_eq!((good.len(), bad.len()), (255, 255));
    fs::write(d.inbox.join(&good), b"good bytes").unwrap();
    fs::write(d.inbox.join(&bad), b"poison").unwrap();
    let mut s = service(&d, true, FakeRunner::default());
    drain_bounded(&mut s, 10);
    assert_eq!(s.state.counts(), (1, 1));
    assert!(names(&d.inbox).is_empty());
    for dir in [
        d.outbox.clone(),
        d.outbox.join("done"),
        d.outbox.join("failed"),
    ] {
        for n in names(&dir) {
            assert!(n.len() <= fsio::NAME_MAX, "{n}");
        }
    }
    assert_eq!(names(&d.outbox.join("done")).len(), 1);
    assert_eq!(
        names(&d.outbox.join("failed")).len(),
        2,
        "the input and its report"
    );
}

#[test]
fn a_journal_entry_that_cannot_be_finished_does_not_stop_every_start() {
    let d = dirs();
    // As a service before slots were bounded left it: taken, with a slot
    // whose error report name cannot exist, and the input gone.
    let name = format!("{}.nii.gz", "L".repeat(240));
    let mut s = service(&d, true, FakeRunner::default());
    let taken = Record::Taken {
        name: name.clone(),
        sha256: "ab".repeat(32),
        size: 1,
        mtime_ns: 1,
        attempt: 1,
        slot: "L".repeat(240),
        at: now_rfc3339(),
    };
    s.journal.append(&taken).unwrap();
    drop(s);
    let mut s = service(&d, true, FakeRunner::default());
    drain_bounded(&mut s, 10);
    assert_eq!(s.state.counts(), (0, 1));
    drop(s);
    let mut s = service(&d, true, FakeRunner::default());
    drain_bounded(&mut s, 10);
    let failed = names(&d.outbox.join("failed"));
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].len() <= fsio::NAME_MAX);
}

#[test]
fn a_full_outbox_defers_the_input_in_place_and_never_fails_it() {
    let d = dirs();
    fs::write(d.inbox.join("scan.nii.gz"), b"good").unwrap();
    // More full-disk runs than watch.max_attempts (3).
    let mut s = service(
        &d,
        true,
        FakeRunner {
            full_disk: 5,
            ..FakeRunner::default()
        },
    );
    // Each pass may run it more than once (recovery resumes a deferred
    // input at once, then the scan tries it when its pause is over).
    for _ in 0..5 {
        if s.o.runner.runs >= 5 {
            break;
        }
        drain_bounded(&mut s, 10);
        assert_eq!(names(&d.inbox), ["scan.nii.gz"], "kept in place");
        assert!(names(&d.outbox.join("failed")).is_empty(), "never poisoned");
        // The backoff holds it until then; a restart (a new service) or
        // the pause passing tries it again.
        for seen in s.seen.values_mut() {
            seen.retry_at = None;
        }
    }
    drain_bounded(&mut s, 10);
    assert_eq!(s.o.runner.runs, 6);
    assert_eq!(names(&d.outbox.join("done")), ["scan.nii.gz"]);
    let recs = records(&d);
    assert_eq!(count(&recs, |r| matches!(r, Record::Deferred { .. })), 5);
    assert_eq!(count(&recs, |r| matches!(r, Record::Done { .. })), 1);
}

#[test]
fn a_file_that_grew_while_it_failed_is_not_failed_but_processed_once_complete() {
    let d = dirs();
    fs::write(d.inbox.join("scan.nii.gz"), b"first half").unwrap();
    let mut s = service(
        &d,
        true,
        FakeRunner {
            slow_writer: 1,
            ..FakeRunner::default()
        },
    );
    drain_bounded(&mut s, 10);
    assert_eq!(s.o.runner.runs, 2, "tried again once the file was stable");
    assert!(names(&d.outbox.join("failed")).is_empty(), "never failed");
    assert_eq!(names(&d.outbox.join("done")), ["scan.nii.gz"]);
    let done = fs::read(d.outbox.join("done/scan.nii.gz")).unwrap();
    assert_eq!(done, b"first half and the rest");
    let recs = records(&d);
    assert_eq!(count(&recs, |r| matches!(r, Record::Superseded { .. })), 1);
    assert_eq!(count(&recs, |r| matches!(r, Record::Failed { .. })), 0);
    // The slot is the name's own, not a checksum-suffixed one.
    assert!(d.outbox.join("scan_seg.nii.gz").is_file());
}

#[test]
fn a_file_replaced_while_the_service_was_down_is_a_new_input_not_a_failure() {
    let d = dirs();
    fs::write(d.inbox.join("scan.nii.gz"), b"old content").unwrap();
    let mut s = service(&d, true, FakeRunner::default());
    s.crash_at = Some("taken");
    assert!(drain(&mut s).is_err());
    drop(s);
    fs::write(d.inbox.join("scan.nii.gz"), b"new content").unwrap();
    let mut s = service(&d, true, FakeRunner::default());
    drain_bounded(&mut s, 10);
    assert!(
        names(&d.outbox.join("failed")).is_empty(),
        "not failed as vanished"
    );
    assert_eq!(
        fs::read(d.outbox.join("done/scan.nii.gz")).unwrap(),
        b"new content"
    );
    let recs = records(&d);
    assert_eq!(count(&recs, |r| matches!(r, Record::Superseded { .. })), 1);
    assert_eq!(count(&recs, |r| matches!(r, Record::Done { .. })), 1);
}

#[test]
fn the_backoff_grows_to_a_minute() {
    assert_eq!(backoff(0), Duration::from_secs(1));
    assert_eq!(backoff(3), Duration::from_secs(8));
    assert_eq!(backoff(40), Duration::from_secs(60));
}

#[test]
fn a_failed_input_dropped_again_is_filed_with_a_warning_or_retried_when_asked() {
    let d = dirs();
    fs::write(d.inbox.join("bad.nii.gz"), b"poison").unwrap();
    let mut s = service(&d, true, FakeRunner::default());
    drain_bounded(&mut s, 10);
    assert_eq!(s.o.runner.runs, 1);
    // Dropped again: filed without a run.
    fs::copy(
        d.outbox.join("failed/bad.nii.gz"),
        d.inbox.join("bad.nii.gz"),
    )
    .unwrap();
    drain_bounded(&mut s, 10);
    assert_eq!(s.o.runner.runs, 1);
    assert!(names(&d.inbox).is_empty());
    drop(s);
    // With --retry-failed it is run again (once per start).
    fs::copy(
        d.outbox.join("failed/bad.nii.gz"),
        d.inbox.join("bad.nii.gz"),
    )
    .unwrap();
    let mut s = service(&d, true, FakeRunner::default());
    s.o.retry_failed = true;
    drain_bounded(&mut s, 10);
    assert_eq!(s.o.runner.runs, 1, "tried again");
    assert!(names(&d.inbox).is_empty());
    let recs = records(&d);
    assert_eq!(count(&recs, |r| matches!(r, Record::Failed { .. })), 2);
}

#[test]
fn a_file_over_max_input_bytes_is_refused_without_being_read() {
    let d = dirs();
    let f = fs::File::create(d.inbox.join("h.nii")).unwrap();
    // Sparse: 2 TB that take no room.
    f.set_len(2 << 40).unwrap();
    drop(f);
    let mut s = service(&d, true, FakeRunner::default());
    s.o.max_input_bytes = 1 << 30;
    s.hash = |p, _, _| panic!("{} was read", p.display());
    drain_bounded(&mut s, 10);
    assert_eq!(s.o.runner.runs, 0);
    let e: Value = serde_json::from_str(
        &fs::read_to_string(d.outbox.join("failed/h.nii.error.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(e["kind"], "limit", "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("limits.max_input_bytes"),
        "{e}"
    );
}

#[test]
fn hashing_stops_when_asked() {
    use std::io::Read;
    let stop_now = || true;
    let mut zeros = std::io::repeat(0).take(1 << 40);
    let t = Instant::now();
    assert!(
        sha256_of(Path::new("z"), &mut zeros, &stop_now)
            .unwrap()
            .is_none()
    );
    assert!(t.elapsed() < Duration::from_secs(1));
}

#[test]
fn a_file_another_service_has_claimed_is_left_to_it() {
    let d = dirs();
    fs::write(d.inbox.join("a.nii.gz"), b"shared").unwrap();
    // Another service's claim, as claim() takes it.
    let other = match super::super::claim::claim(&d.inbox.join("a.nii.gz")).unwrap() {
        super::super::claim::Claimed::Ours(f) => f,
        _ => panic!("no claim"),
    };
    let mut s = service(&d, true, FakeRunner::default());
    drain_bounded(&mut s, 10);
    assert_eq!(s.o.runner.runs, 0, "busy: not processed");
    assert!(records(&d).is_empty(), "nor journaled");
    drop(other);
    for seen in s.seen.values_mut() {
        seen.retry_at = None;
    }
    drain_bounded(&mut s, 10);
    assert_eq!(s.o.runner.runs, 1);
}

#[test]
fn only_errors_of_the_place_written_to_are_transient() {
    use infl8_core::nifti_io::NiftiIoError;
    use infl8_core::segment::SegmentError;
    let os = |code| std::io::Error::from_raw_os_error(code);
    let write = |code| fsio::WriteError::Io {
        path: "out/x_seg.nii.gz".into(),
        action: "write",
        error: os(code),
    };
    for code in [libc::ENOSPC, libc::EROFS, libc::EACCES, libc::EDQUOT] {
        let e = anyhow::Error::new(write(code)).context("writing the results");
        assert!(super::super::is_transient(&e), "{code}");
        let seg = SegmentError::Nifti(NiftiIoError::Write(write(code)));
        assert!(
            super::super::is_transient(&anyhow::Error::new(seg)),
            "{code}"
        );
    }
    // Reading the input is never the outbox's fault, whatever the errno.
    let read = SegmentError::Nifti(NiftiIoError::Io {
        path: "in/x.nii".into(),
        action: "read",
        source: os(libc::EACCES),
    });
    assert!(!super::super::is_transient(&anyhow::Error::new(read)));
    assert!(!super::super::is_transient(&anyhow::Error::new(write(
        libc::EINVAL
    ))));
    assert!(!super::super::is_transient(&anyhow::anyhow!(
        "corrupt gzip stream"
    )));
}
