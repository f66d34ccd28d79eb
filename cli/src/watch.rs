//! `infl8 watch`: the scanner-side service (inbox -> outbox, journaled).
//!
//! A supervisor polls the inbox and runs each volume in a worker process
//! (this binary again, with the same flags and a hidden `--worker-job`), so
//! the per-volume timeout is a real kill and a plugin that crashes takes
//! only its worker down. The supervisor alone writes the journal; the
//! worker writes the segmentation and its report, each to a temporary name,
//! fsynced and renamed.
//!
//! # Crash invariant
//!
//! Each input goes through these steps; every one is durable (fsynced)
//! before the next starts:
//!
//! 1. `taken` is appended to the journal (attempt n, result names fixed);
//! 2. the worker writes `<slot>_seg.nii.gz`, then `<slot>.report.json`;
//! 3. `done` is appended (or, for a poison input: `failed/<name>.error.json`
//!    is written, then `failed` is appended);
//! 4. the input is moved to `done/` (or `failed/`).
//!
//! So at any moment, for every input the journal knows: no outcome means
//! the service died in steps 1-3 and the input is still in the inbox; an
//! outcome means its results are complete and only the move may be
//! missing. On start, the journal is replayed and: temporary files are
//! removed (no partial output survives); an input with an outcome that is
//! still in the inbox is moved (never processed again); an input without
//! one is finished: recorded `done` if its report already names its
//! checksum (the service died after step 2), otherwise run again as
//! attempt n+1, and after `watch.max_attempts` such attempts failed as
//! poison. Results are only ever replaced whole, by a rerun of the same
//! input under the same names.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Args;
use infl8_core::config::WatchSettings;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tracing::{error, info, warn};

use crate::commands::{is_nifti, nifti_stem, prepare, settings_for, write_atomic};
use crate::flags::{ModelArgs, PostprocessArgs, RuntimeArgs};
use crate::journal::{Item, Journal, Key, Outcome, Record, State};

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Folder new NIfTI files arrive in (`*.part` and dotfiles are ignored).
    #[arg(long, value_name = "DIR", required_unless_present = "status")]
    pub inbox: Option<PathBuf>,
    /// Folder results are written to (also holds done/, failed/ and the
    /// journal in .infl8/).
    #[arg(long, value_name = "DIR")]
    pub outbox: PathBuf,
    /// Print the status of the service on this outbox and exit.
    #[arg(long)]
    pub status: bool,
    /// ONNX model (with an infl8 manifest, or settings given as flags).
    #[arg(long, value_name = "MODEL.onnx", required_unless_present = "status")]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub model_flags: ModelArgs,
    #[command(flatten)]
    pub post: PostprocessArgs,
    /// Internal: run one volume as the supervisor's worker.
    #[arg(long, hide = true, value_name = "JSON")]
    pub worker_job: Option<String>,
}

impl WatchArgs {
    fn layer(&self) -> Value {
        let mut top = self.runtime.layer();
        let model = self.model_flags.layer();
        if !model.is_empty() {
            top.insert("model".into(), Value::Object(model));
        }
        self.post.add_to(&mut top);
        Value::Object(top)
    }
}

/// What the supervisor hands a worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct WorkerJob {
    input: PathBuf,
    name: String,
    sha256: String,
    size: u64,
    attempt: u32,
    output: PathBuf,
    report: PathBuf,
    model_sha256: String,
}

/// Set by SIGTERM / SIGINT.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

pub fn run(a: WatchArgs) -> Result<ExitCode> {
    if let Some(job) = &a.worker_job {
        return Ok(worker(&a, job));
    }
    if a.status {
        return print_status(&a.outbox);
    }
    let (Some(inbox), Some(model)) = (a.inbox.clone(), a.model.clone()) else {
        bail!("--inbox and --model are required");
    };
    // From the start: a SIGTERM while the model loads is a clean stop too.
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        let h = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGTERM, h);
        libc::signal(libc::SIGINT, h);
    }
    let settings = settings_for(&a.runtime, &a.layer())?;
    if !inbox.is_dir() {
        bail!("inbox {} is not a folder", inbox.display());
    }
    fs::create_dir_all(&a.outbox)
        .with_context(|| format!("cannot create outbox {}", a.outbox.display()))?;
    if same_dir(&inbox, &a.outbox) {
        bail!("the inbox and the outbox must be different folders");
    }
    // A model or profile that cannot work fails the service now, instead of
    // failing every input as poison.
    let t = Instant::now();
    drop(prepare(&settings, &model)?);
    info!(
        load_s = format!("{:.2}", t.elapsed().as_secs_f64()),
        "model checked; each volume loads it again in its worker"
    );
    let model_sha256 = sha256_file(&model)?;
    if SIGNALLED.load(Ordering::SeqCst) {
        info!("stopped before starting");
        return Ok(ExitCode::SUCCESS);
    }
    let runner = ChildRunner {
        exe: std::env::current_exe().context("cannot find the infl8 executable")?,
        args: std::env::args_os().skip(1).collect(),
        timeout_s: settings.limits.timeout_s,
    };
    let mut service = Service::open(Options {
        inbox,
        outbox: a.outbox.clone(),
        watch: settings.watch.clone(),
        model: model.clone(),
        model_sha256,
        runner,
        stop: Arc::new(AtomicBool::new(false)),
    })?;
    service.run()?;
    Ok(ExitCode::SUCCESS)
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y || y.starts_with(&x),
        _ => false,
    }
}

pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// UTC time as RFC 3339 (`2024-05-01T12:00:00.123Z`).
pub(crate) fn now_rfc3339() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

// ---------------------------------------------------------------- worker

/// One volume, in the worker process: load, segment, write the report.
/// Stdout carries `{"loaded":true}` once the model is loaded and a final
/// `{"ok":true}` or `{"error":"..."}` line; logs go to stderr.
fn worker(a: &WatchArgs, job: &str) -> ExitCode {
    let result = (|| -> Result<()> {
        let job: WorkerJob = serde_json::from_str(job).context("bad --worker-job")?;
        let t0 = Instant::now();
        let settings = settings_for(&a.runtime, &a.layer())?;
        let model = a.model.as_deref().context("--model is required")?;
        let prepared = prepare(&settings, model)?;
        let load_s = t0.elapsed().as_secs_f64();
        say(&json!({"loaded": true}));
        prepared.deadline.start();
        let t1 = Instant::now();
        let limits = settings.limits.read_limits();
        let r = prepared
            .segmenter
            .segment_file(&job.input, &job.output, None, &limits, &|_, _| {});
        let r = match r {
            Ok(r) => r,
            Err(_) if prepared.deadline.expired() => {
                return Err(prepared.deadline.error(&job.input));
            }
            Err(e) => return Err(e.into()),
        };
        let report = json!({
            "input": job.name,
            "input_sha256": job.sha256,
            "input_bytes": job.size,
            "output": job.output.file_name().map(|n| n.to_string_lossy().into_owned()),
            "model": model,
            "model_sha256": job.model_sha256,
            "backend": prepared.backend,
            "window_batch": prepared.segmenter.window_batch,
            "attempt": job.attempt,
            "dims": r.dims,
            "windows": r.windows,
            "label_voxels": r.label_voxels,
            "timings": {
                "load_s": load_s,
                "read_s": r.read_s,
                "infer_s": r.infer_s,
                "write_s": r.write_s,
                "total_s": t1.elapsed().as_secs_f64() + load_s,
            },
            "peak_rss_bytes": r.peak_rss_bytes,
            "infl8_version": env!("CARGO_PKG_VERSION"),
            "finished_at": now_rfc3339(),
        });
        write_atomic(
            &job.report,
            serde_json::to_string_pretty(&report)?.as_bytes(),
        )?;
        Ok(())
    })();
    match result {
        Ok(()) => {
            say(&json!({"ok": true}));
            ExitCode::SUCCESS
        }
        Err(e) => {
            // As the command line prints errors: a plugin's message is often
            // quoted by the error above it, and would appear twice.
            say(&json!({"error": crate::error_chain(&e)}));
            ExitCode::FAILURE
        }
    }
}

fn say(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

// ---------------------------------------------------------------- runners

/// How one volume ended, as far as the supervisor can tell.
#[derive(Debug)]
pub(crate) enum RunResult {
    /// The output and report were written.
    Ok,
    /// The input is poison: `kind` classifies, `reason` is the error.
    Failed { kind: &'static str, reason: String },
    /// The worker died from a signal while the service was stopping: the
    /// input is left for the next start, unrecorded.
    Interrupted,
    /// Not the input's fault (the model failed to load): the service stops.
    Service(String),
}

pub(crate) trait Runner {
    fn run(&mut self, job: &WorkerJob, stopping: &dyn Fn() -> bool) -> RunResult;
}

/// Runs each volume in a child `infl8 watch ... --worker-job`.
struct ChildRunner {
    exe: PathBuf,
    args: Vec<OsString>,
    timeout_s: f64,
}

/// Past the volume's own deadline, what a worker gets to notice it and stop
/// cleanly before it is killed.
const KILL_GRACE: Duration = Duration::from_secs(5);

impl Runner for ChildRunner {
    fn run(&mut self, job: &WorkerJob, stopping: &dyn Fn() -> bool) -> RunResult {
        let job_json = match serde_json::to_string(job) {
            Ok(j) => j,
            Err(e) => return RunResult::Service(e.to_string()),
        };
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.args)
            .arg("--worker-job")
            .arg(job_json)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own process group: a terminal's Ctrl-C reaches only the
            // supervisor, which lets the current volume finish.
            .process_group(0);
        // SAFETY: only async-signal-safe calls between fork and exec.
        let parent = std::process::id() as libc::pid_t;
        unsafe {
            cmd.pre_exec(move || {
                // The worker dies with the supervisor (kill -9 included), so
                // no orphan keeps writing after a restart.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The supervisor decides when a volume stops: a SIGTERM sent
                // to every process of the service (systemd's default
                // KillMode=control-group) must not cut short the volume it
                // lets finish. Ignored dispositions survive exec, so there is
                // no window before the worker could ignore it itself. The
                // supervisor stops a worker with SIGKILL (timeout), and the
                // kernel does when the supervisor dies.
                libc::signal(libc::SIGTERM, libc::SIG_IGN);
                libc::signal(libc::SIGINT, libc::SIG_IGN);
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return RunResult::Service(format!("cannot start a worker: {e}")),
        };
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = child.stdout.take().map(|out| {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
        });
        let mut loaded_at: Option<Instant> = None;
        let mut error: Option<String> = None;
        let mut handle = |line: String, loaded_at: &mut Option<Instant>| {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["loaded"] == json!(true) {
                    *loaded_at = Some(Instant::now());
                }
                if let Some(e) = v["error"].as_str() {
                    error = Some(e.to_string());
                }
            }
        };
        let limit = (self.timeout_s > 0.0).then(|| Duration::from_secs_f64(self.timeout_s));
        let status = loop {
            while let Ok(line) = rx.try_recv() {
                handle(line, &mut loaded_at);
            }
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) => {}
                Err(e) => return RunResult::Service(format!("cannot wait for the worker: {e}")),
            }
            if let (Some(limit), Some(at)) = (limit, loaded_at)
                && at.elapsed() > limit + KILL_GRACE
            {
                let _ = child.kill();
                let _ = child.wait();
                if let Some(r) = reader {
                    let _ = r.join();
                }
                return RunResult::Failed {
                    kind: "timeout",
                    reason: format!(
                        "{}: timed out: the worker was killed {:.1} s after loading the model \
                         (limits.timeout_s = {} s)",
                        job.input.display(),
                        at.elapsed().as_secs_f64(),
                        self.timeout_s
                    ),
                };
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(r) = reader {
            let _ = r.join();
        }
        while let Ok(line) = rx.try_recv() {
            handle(line, &mut loaded_at);
        }
        tracing::debug!(wall_s = started.elapsed().as_secs_f64(), "worker finished");
        if status.success() {
            return RunResult::Ok;
        }
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            if stopping() && matches!(sig, libc::SIGTERM | libc::SIGINT | libc::SIGKILL) {
                return RunResult::Interrupted;
            }
            return RunResult::Failed {
                kind: "crashed",
                reason: format!(
                    "{}: the worker died from signal {sig} while segmenting it",
                    job.input.display()
                ),
            };
        }
        let reason = error.unwrap_or_else(|| format!("the worker exited with {status}"));
        if loaded_at.is_none() {
            return RunResult::Service(format!("the worker could not load the model: {reason}"));
        }
        RunResult::Failed {
            kind: error_kind(&reason),
            reason,
        }
    }
}

/// `limit` for an input refused by one of the profile's `limits` (the
/// reader names some by their library names), else `error`.
fn error_kind(reason: &str) -> &'static str {
    const LIMITS: [&str; 4] = [
        "limits.",
        "ReadLimits::max_voxels",
        "NaN or infinite",
        "max_input_bytes",
    ];
    if LIMITS.iter().any(|l| reason.contains(l)) {
        "limit"
    } else {
        "error"
    }
}

// ---------------------------------------------------------------- service

pub(crate) struct Options<R> {
    pub inbox: PathBuf,
    pub outbox: PathBuf,
    pub watch: WatchSettings,
    pub model: PathBuf,
    pub model_sha256: String,
    pub runner: R,
    /// Asks the service to stop after the current volume (as SIGTERM does).
    pub stop: Arc<AtomicBool>,
}

/// Written atomically to `<outbox>/.infl8/status.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Status {
    pub state: String,
    pub pid: u32,
    pub started_at: String,
    pub updated_at: String,
    pub inbox: PathBuf,
    pub outbox: PathBuf,
    pub model: PathBuf,
    pub model_sha256: String,
    /// Files in the inbox not processed yet (arriving ones included).
    pub queue: usize,
    pub done: usize,
    pub failed: usize,
    pub current: Option<String>,
    pub last_input: Option<String>,
    pub last_latency_s: Option<f64>,
}

/// When a file's size and mtime were first seen as they are now.
struct Seen {
    size: u64,
    mtime_ns: u64,
    since: Instant,
    /// The file could not be read: not tried again before this, so one
    /// unreadable file neither spins the loop nor holds up the files after it.
    retry_at: Option<Instant>,
}

impl Seen {
    /// The file as this scan sees it, from now on.
    fn first(c: &Candidate, now: Instant) -> Seen {
        Seen {
            size: c.size,
            mtime_ns: c.mtime_ns,
            since: now,
            retry_at: None,
        }
    }
}

/// How long an inbox file that cannot be read waits before another try
/// (a change of its size or mtime retries at once).
const UNREADABLE_RETRY: Duration = Duration::from_secs(30);

/// A file in the inbox.
struct Candidate {
    name: String,
    path: PathBuf,
    size: u64,
    mtime_ns: u64,
}

pub(crate) struct Service<R> {
    o: Options<R>,
    state_dir: PathBuf,
    journal: Journal,
    state: State,
    seen: HashMap<String, Seen>,
    /// Names whose `NAME.part` was in the inbox at the last scan: when NAME
    /// appears instead, the writer has renamed it, so it is complete.
    parts: HashSet<String>,
    /// Files seen to arrive by that rename, complete without a wait (until
    /// they change or are processed).
    renamed: HashSet<String>,
    /// Inbox entries whose names are not UTF-8, already warned about.
    bad_names: HashSet<OsString>,
    /// Reads an input's checksum (tests replace it to fake unreadable files).
    hash: fn(&Path) -> Result<String>,
    status: Status,
    _lock: fs::File,
    /// Tests: fail (as a crash would) right after the named step.
    crash_at: Option<&'static str>,
}

fn mtime_ns(m: &fs::Metadata) -> u64 {
    u64::try_from(m.mtime()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(m.mtime_nsec()).unwrap_or(0)
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync {}", dir.display()))
}

/// `name` minus its stem: `.nii.gz`, `.nii` or nothing.
fn extension_of(name: &str) -> &str {
    let stem = nifti_stem(std::ffi::OsStr::new(name));
    &name[stem.len().min(name.len())..]
}

impl<R: Runner> Service<R> {
    /// Takes the outbox's lock, replays the journal and repairs what a
    /// crash left (see the module docs).
    pub(crate) fn open(o: Options<R>) -> Result<Self> {
        let state_dir = o.outbox.join(".infl8");
        for d in [
            state_dir.clone(),
            o.outbox.join("done"),
            o.outbox.join("failed"),
        ] {
            if !d.is_dir() {
                fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
                if let Some(p) = d.parent() {
                    sync_dir(p)?;
                }
            }
        }
        let lock = lock(&state_dir.join("lock"))?;
        let (journal, records) = Journal::open(&state_dir.join("journal.jsonl"))?;
        let state = State::replay(&records);
        let status = Status {
            state: "running".into(),
            pid: std::process::id(),
            started_at: now_rfc3339(),
            inbox: o.inbox.clone(),
            outbox: o.outbox.clone(),
            model: o.model.clone(),
            model_sha256: o.model_sha256.clone(),
            ..Status::default()
        };
        let s = Service {
            o,
            state_dir,
            journal,
            state,
            seen: HashMap::new(),
            parts: HashSet::new(),
            renamed: HashSet::new(),
            bad_names: HashSet::new(),
            hash: sha256_file,
            status,
            _lock: lock,
            crash_at: None,
        };
        s.remove_temporaries()?;
        Ok(s)
    }

    fn stopping(&self) -> bool {
        self.o.stop.load(Ordering::SeqCst) || SIGNALLED.load(Ordering::SeqCst)
    }

    fn point(&self, step: &'static str) -> Result<()> {
        if self.crash_at == Some(step) {
            bail!("simulated crash after step {step}");
        }
        Ok(())
    }

    /// Half-written results of a worker that died: never complete, never
    /// referenced by the journal.
    fn remove_temporaries(&self) -> Result<()> {
        for dir in [
            self.o.outbox.clone(),
            self.o.outbox.join("done"),
            self.o.outbox.join("failed"),
            self.state_dir.clone(),
        ] {
            let entries =
                fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?;
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.')
                    && (name.ends_with(".infl8-tmp") || name.ends_with(".part"))
                {
                    warn!(file = %e.path().display(), "removing a partial file left by a crash");
                    fs::remove_file(e.path())
                        .with_context(|| format!("cannot remove {}", e.path().display()))?;
                }
            }
        }
        Ok(())
    }

    /// The temporary files of these results (`.NAME.*.infl8-tmp`,
    /// `.NAME.*.part`), which only a worker that is not running writes.
    fn remove_temporaries_of(&self, results: &[&Path]) {
        let prefixes: Vec<String> = results
            .iter()
            .filter_map(|p| p.file_name())
            .map(|n| format!(".{}.", n.to_string_lossy()))
            .collect();
        let Ok(entries) = fs::read_dir(&self.o.outbox) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if prefixes.iter().any(|p| name.starts_with(p.as_str()))
                && (name.ends_with(".infl8-tmp") || name.ends_with(".part"))
            {
                warn!(file = %e.path().display(), "removing a partial file of a killed worker");
                if let Err(e) = fs::remove_file(e.path()) {
                    warn!("cannot remove it: {e}");
                }
            }
        }
    }

    fn write_status(&mut self) {
        let (done, failed) = self.state.counts();
        self.status.done = done;
        self.status.failed = failed;
        self.status.updated_at = now_rfc3339();
        let path = self.state_dir.join("status.json");
        match serde_json::to_vec_pretty(&self.status) {
            Ok(b) => {
                if let Err(e) = write_atomic(&path, &b) {
                    warn!("cannot write the status file: {e:#}");
                }
            }
            Err(e) => warn!("cannot encode the status: {e}"),
        }
    }

    /// Runs until asked to stop (signal or `stop`), finishing the current
    /// volume first.
    pub(crate) fn run(&mut self) -> Result<()> {
        info!(
            inbox = %self.o.inbox.display(),
            outbox = %self.o.outbox.display(),
            "watching"
        );
        self.recover()?;
        self.write_status();
        let result = (|| -> Result<()> {
            while !self.stopping() {
                if !self.step()? {
                    let until = Instant::now() + Duration::from_millis(self.o.watch.poll_ms);
                    while !self.stopping() && Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
            Ok(())
        })();
        self.status.state = if result.is_ok() { "stopped" } else { "crashed" }.into();
        self.status.current = None;
        // The queue as the service leaves it: the last scan counted the
        // volume just finished, and a stop comes before the next scan.
        if let Ok((candidates, _)) = self.candidates() {
            self.status.queue = self.queued(&candidates);
        }
        self.write_status();
        info!("stopped");
        result
    }

    /// Finishes inputs the journal shows as interrupted by a crash.
    fn recover(&mut self) -> Result<()> {
        let interrupted: Vec<Item> = self.state.interrupted().into_iter().cloned().collect();
        for item in interrupted {
            if self.stopping() {
                return Ok(());
            }
            let path = self.o.inbox.join(&item.key.name);
            let meta = fs::metadata(&path).ok().filter(|m| m.is_file());
            let same = match &meta {
                Some(_) => sha256_file(&path).ok().as_deref() == Some(&item.key.sha256),
                None => false,
            };
            info!(input = %item.key.name, attempts = item.attempts, "resuming an interrupted volume");
            if same && let Some(m) = meta {
                let c = Candidate {
                    name: item.key.name.clone(),
                    path,
                    size: m.len(),
                    mtime_ns: mtime_ns(&m),
                };
                self.process(&c, &item.key.sha256)?;
            } else if self.report_matches(&item.slot, &item.key.sha256) {
                self.record_done(&item.key, &item.slot, 0.0)?;
            } else {
                let reason = format!(
                    "{}: the input left the inbox (or changed) before it was processed",
                    item.key.name
                );
                self.fail(&item.key, &item.slot, item.attempts, "vanished", &reason)?;
            }
        }
        Ok(())
    }

    /// How many of the inbox's files are waiting: not finished.
    fn queued(&self, candidates: &[Candidate]) -> usize {
        candidates
            .iter()
            .filter(|c| {
                self.state
                    .finished_as(&c.name, c.size, c.mtime_ns)
                    .is_none()
            })
            .count()
    }

    /// The inbox's files, oldest first, and the names whose `.part` is there.
    fn candidates(&mut self) -> Result<(Vec<Candidate>, HashSet<String>)> {
        let entries = fs::read_dir(&self.o.inbox)
            .with_context(|| format!("cannot list {}", self.o.inbox.display()))?;
        let mut out = Vec::new();
        let mut parts = HashSet::new();
        for e in entries.flatten() {
            // The journal, the reports and the moves name inputs by a UTF-8
            // string; a name that is not one would be recorded under a lossy
            // copy that names no file, so it is left alone, with a warning.
            let name = match e.file_name().into_string() {
                Ok(n) => n,
                Err(raw) => {
                    if self.bad_names.insert(raw.clone()) {
                        warn!(
                            file = %e.path().display(),
                            "ignoring an inbox file whose name is not UTF-8: rename it"
                        );
                    }
                    continue;
                }
            };
            if name.starts_with('.') {
                continue;
            }
            if name.to_ascii_lowercase().ends_with(".part") {
                // ASCII suffix: cutting it keeps a char boundary.
                parts.insert(name[..name.len() - 5].to_string());
                continue;
            }
            let Ok(m) = e.metadata() else { continue };
            if !m.is_file() {
                continue;
            }
            out.push(Candidate {
                name,
                path: e.path(),
                size: m.len(),
                mtime_ns: mtime_ns(&m),
            });
        }
        out.sort_by(|a, b| (a.mtime_ns, &a.name).cmp(&(b.mtime_ns, &b.name)));
        Ok((out, parts))
    }

    /// One scan; processes the first complete file. False when none was.
    fn step(&mut self) -> Result<bool> {
        let now = Instant::now();
        let stable = Duration::from_secs_f64(self.o.watch.stable_secs);
        let mut ready = None;
        let mut present = Vec::new();
        let (candidates, parts) = self.candidates()?;
        let queue = self.queued(&candidates);
        for c in candidates {
            present.push(c.name.clone());
            let retry_later = self.seen.get(&c.name).is_some_and(|s| {
                s.size == c.size && s.mtime_ns == c.mtime_ns && s.retry_at.is_some_and(|t| now < t)
            });
            if self
                .state
                .finished_as(&c.name, c.size, c.mtime_ns)
                .is_some()
            {
                // Finished: the service died before the move, or inputs stay
                // in place. Left in place, it is never processed again. To be
                // moved, it is hashed first: a new file of the same name,
                // size and mtime (a copy that kept its mtime) is a new input,
                // not one to file under done/ unread.
                if self.o.watch.move_inputs && ready.is_none() && !retry_later {
                    ready = Some(c);
                }
                continue;
            }
            // Renamed from NAME.part since the last scan (and the .part is
            // gone): the writer says it is complete, no need to wait.
            let just_renamed = self.parts.contains(&c.name) && !parts.contains(&c.name);
            if just_renamed {
                self.renamed.insert(c.name.clone());
            }
            let seen = self
                .seen
                .entry(c.name.clone())
                .or_insert(Seen::first(&c, now));
            if seen.size != c.size || seen.mtime_ns != c.mtime_ns {
                *seen = Seen::first(&c, now);
                // Written to after the rename: judged by stability again.
                if !just_renamed {
                    self.renamed.remove(&c.name);
                }
            }
            let complete =
                self.renamed.contains(&c.name) || now.duration_since(seen.since) >= stable;
            if ready.is_none() && !retry_later && complete {
                ready = Some(c);
            }
        }
        self.parts = parts;
        self.seen.retain(|n, _| present.contains(n));
        self.renamed.retain(|n| present.contains(n));
        if queue != self.status.queue {
            self.status.queue = queue;
            self.write_status();
        }
        let Some(c) = ready else {
            return Ok(false);
        };
        let sha = match (self.hash)(&c.path) {
            Ok(sha) => sha,
            Err(e) => {
                if fs::metadata(&c.path).is_ok() {
                    warn!(
                        input = %c.name,
                        retry_s = UNREADABLE_RETRY.as_secs(),
                        "cannot read an inbox file, trying the others: {e:#}"
                    );
                    // Finished files are not tracked yet: the entry is new.
                    let seen = self
                        .seen
                        .entry(c.name.clone())
                        .or_insert(Seen::first(&c, now));
                    seen.retry_at = Some(Instant::now() + UNREADABLE_RETRY);
                }
                // Else it is gone between listing and reading: not ours to judge.
                return Ok(true);
            }
        };
        // Still being written: wait for it to settle again.
        match fs::metadata(&c.path) {
            Ok(m) if m.len() == c.size && mtime_ns(&m) == c.mtime_ns => {}
            _ => {
                self.seen.remove(&c.name);
                self.renamed.remove(&c.name);
                return Ok(true);
            }
        }
        self.process(&c, &sha)?;
        self.seen.remove(&c.name);
        self.renamed.remove(&c.name);
        Ok(true)
    }

    fn slot_paths(&self, slot: &str) -> (PathBuf, PathBuf) {
        (
            self.o.outbox.join(format!("{slot}_seg.nii.gz")),
            self.o.outbox.join(format!("{slot}.report.json")),
        )
    }

    /// The slot's report exists and is for this input's bytes, and so does
    /// its output (the worker writes the report last).
    fn report_matches(&self, slot: &str, sha256: &str) -> bool {
        let (output, report) = self.slot_paths(slot);
        let Ok(text) = fs::read_to_string(&report) else {
            return false;
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            return false;
        };
        v["input_sha256"].as_str() == Some(sha256) && output.is_file()
    }

    fn process(&mut self, c: &Candidate, sha256: &str) -> Result<()> {
        let key = Key {
            name: c.name.clone(),
            sha256: sha256.to_string(),
        };
        let existing = self.state.get(&key).cloned();
        if let Some(item) = &existing {
            if let Some(outcome) = &item.outcome {
                return self.finish_move(&key, &item.slot, matches!(outcome, Outcome::Done { .. }));
            }
            // Checked before the attempts: results complete before the
            // service died on its last allowed attempt are recorded, not
            // failed as poison next to them.
            if self.report_matches(&item.slot, sha256) {
                info!(input = %c.name, "its results were complete before the restart");
                return self.record_done(&key, &item.slot, 0.0);
            }
            if item.attempts >= self.o.watch.max_attempts {
                let reason = format!(
                    "{}: the service died {} time(s) while processing it \
                     (watch.max_attempts = {})",
                    c.name, item.attempts, self.o.watch.max_attempts
                );
                return self.fail(&key, &item.slot, item.attempts, "crashed", &reason);
            }
        }
        let slot = match &existing {
            Some(item) => item.slot.clone(),
            None => {
                let stem = nifti_stem(std::ffi::OsStr::new(&c.name));
                self.state.new_slot(&stem, sha256, |s| {
                    let (o, r) = self.slot_paths(s);
                    o.exists() || r.exists()
                })
            }
        };
        let attempt = existing.as_ref().map_or(0, |i| i.attempts) + 1;
        let taken = Record::Taken {
            name: c.name.clone(),
            sha256: sha256.to_string(),
            size: c.size,
            mtime_ns: c.mtime_ns,
            attempt,
            slot: slot.clone(),
            at: now_rfc3339(),
        };
        self.journal.append(&taken)?;
        self.state.apply(&taken);
        self.point("taken")?;
        self.status.current = Some(c.name.clone());
        self.write_status();
        let t0 = Instant::now();
        if !is_nifti(&c.path) {
            let reason = format!("{}: not a .nii or .nii.gz file", c.name);
            return self.fail(&key, &slot, attempt, "not_nifti", &reason);
        }
        let (output, report) = self.slot_paths(&slot);
        let job = WorkerJob {
            input: c.path.clone(),
            name: c.name.clone(),
            sha256: sha256.to_string(),
            size: c.size,
            attempt,
            output,
            report,
            model_sha256: self.o.model_sha256.clone(),
        };
        let stop = self.o.stop.clone();
        let stopping = move || stop.load(Ordering::SeqCst) || SIGNALLED.load(Ordering::SeqCst);
        let result = self.o.runner.run(&job, &stopping);
        if !matches!(result, RunResult::Ok) {
            // A worker killed (timeout, crash, signal) leaves its temporary
            // files; only a restart would remove them otherwise.
            self.remove_temporaries_of(&[&job.output, &job.report]);
        }
        self.point("ran")?;
        match result {
            RunResult::Ok => {
                if !self.report_matches(&slot, sha256) {
                    let reason = format!("{}: the worker succeeded but wrote no report", c.name);
                    return self.fail(&key, &slot, attempt, "error", &reason);
                }
                self.record_done(&key, &slot, t0.elapsed().as_secs_f64())
            }
            RunResult::Failed { kind, reason } => self.fail(&key, &slot, attempt, kind, &reason),
            RunResult::Interrupted => {
                info!(input = %c.name, "stopping: the volume is left for the next start");
                Ok(())
            }
            RunResult::Service(reason) => bail!("{reason}"),
        }
    }

    fn record_done(&mut self, key: &Key, slot: &str, latency_s: f64) -> Result<()> {
        let (output, report) = self.slot_paths(slot);
        let name_of = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
        let r = Record::Done {
            name: key.name.clone(),
            sha256: key.sha256.clone(),
            output: name_of(&output).unwrap_or_default(),
            report: name_of(&report).unwrap_or_default(),
            latency_s,
            at: now_rfc3339(),
        };
        self.journal.append(&r)?;
        self.state.apply(&r);
        self.point("done")?;
        info!(
            input = %key.name,
            output = %output.display(),
            latency_s = format!("{latency_s:.2}"),
            "segmented"
        );
        self.status.current = None;
        self.status.last_input = Some(key.name.clone());
        self.status.last_latency_s = Some(latency_s);
        self.finish_move(key, slot, true)?;
        self.write_status();
        Ok(())
    }

    fn fail(
        &mut self,
        key: &Key,
        slot: &str,
        attempt: u32,
        kind: &str,
        reason: &str,
    ) -> Result<()> {
        let slot_name = format!("{slot}{}", extension_of(&key.name));
        let report = self
            .o
            .outbox
            .join("failed")
            .join(format!("{slot_name}.error.json"));
        let body = json!({
            "input": key.name,
            "input_sha256": key.sha256,
            "kind": kind,
            "error": reason,
            "attempt": attempt,
            "failed_at": now_rfc3339(),
            "infl8_version": env!("CARGO_PKG_VERSION"),
        });
        write_atomic(&report, serde_json::to_string_pretty(&body)?.as_bytes())?;
        self.point("error-report")?;
        let r = Record::Failed {
            name: key.name.clone(),
            sha256: key.sha256.clone(),
            reason: reason.to_string(),
            error_report: format!("failed/{slot_name}.error.json"),
            at: now_rfc3339(),
        };
        self.journal.append(&r)?;
        self.state.apply(&r);
        self.point("failed")?;
        error!(input = %key.name, kind, "failed: {reason}");
        self.status.current = None;
        self.status.last_input = Some(key.name.clone());
        self.finish_move(key, slot, false)?;
        self.write_status();
        Ok(())
    }

    /// Moves a finished input out of the inbox (when `move_inputs`).
    /// Idempotent: a restart repeats it safely.
    fn finish_move(&mut self, key: &Key, slot: &str, done: bool) -> Result<()> {
        if !self.o.watch.move_inputs {
            return Ok(());
        }
        let src = self.o.inbox.join(&key.name);
        if !src.is_file() {
            return Ok(());
        }
        let dir = self.o.outbox.join(if done { "done" } else { "failed" });
        let dest = dir.join(format!("{slot}{}", extension_of(&key.name)));
        if let Err(e) = fs::rename(&src, &dest) {
            if e.raw_os_error() != Some(libc::EXDEV) {
                return Err(e).with_context(|| {
                    format!("cannot move {} to {}", src.display(), dest.display())
                });
            }
            // Another filesystem: copy under a temporary name, then remove.
            let tmp = dir.join(format!(".{}.{}.part", key.name, std::process::id()));
            fs::copy(&src, &tmp)
                .and_then(|_| fs::File::open(&tmp)?.sync_all())
                .and_then(|()| fs::rename(&tmp, &dest))
                .with_context(|| format!("cannot copy {} to {}", src.display(), dest.display()))?;
            sync_dir(&dir)?;
            fs::remove_file(&src).with_context(|| format!("cannot remove {}", src.display()))?;
        }
        sync_dir(&dir)?;
        sync_dir(&self.o.inbox)?;
        self.point("moved")
    }
}

/// An exclusive lock on the outbox, held for the life of the process (the
/// kernel drops it when the process dies, `kill -9` included).
fn lock(path: &Path) -> Result<fs::File> {
    use std::os::fd::AsRawFd;
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let holder = fs::read_to_string(path).unwrap_or_default();
        bail!(
            "another infl8 watch (pid {}) is running on this outbox ({} is locked)",
            holder.trim(),
            path.display()
        );
    }
    let mut f = f;
    f.set_len(0)?;
    write!(f, "{}", std::process::id())?;
    Ok(f)
}

fn print_status(outbox: &Path) -> Result<ExitCode> {
    let path = outbox.join(".infl8/status.json");
    let text = fs::read_to_string(&path).with_context(|| {
        format!(
            "no status at {} (has infl8 watch run on this outbox?)",
            path.display()
        )
    })?;
    let status: Status =
        serde_json::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))?;
    let alive = Path::new(&format!("/proc/{}", status.pid)).exists();
    let state = if status.state == "running" && !alive {
        "not running (the service died; a restart resumes it)".to_string()
    } else {
        status.state.clone()
    };
    println!("state:        {state}");
    println!("pid:          {}", status.pid);
    println!("started:      {}", status.started_at);
    println!("updated:      {}", status.updated_at);
    println!("inbox:        {}", status.inbox.display());
    println!(
        "model:        {} (sha256 {})",
        status.model.display(),
        status.model_sha256
    );
    println!("queue:        {}", status.queue);
    println!("done:         {}", status.done);
    println!("failed:       {}", status.failed);
    println!("current:      {}", status.current.as_deref().unwrap_or("-"));
    println!(
        "last input:   {}",
        status.last_input.as_deref().unwrap_or("-")
    );
    match status.last_latency_s {
        Some(l) => println!("last latency: {l:.2} s (last volume segmented)"),
        None => println!("last latency: -"),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests;
