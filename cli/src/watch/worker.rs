//! One volume in a worker process, and the supervisor's side of it.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use infl8_core::fsio;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{WatchArgs, now_rfc3339};
use crate::commands::{prepare, settings_for};

/// What the supervisor hands a worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct WorkerJob {
    pub input: PathBuf,
    pub name: String,
    pub sha256: String,
    pub size: u64,
    pub attempt: u32,
    pub output: PathBuf,
    pub report: PathBuf,
    pub model_sha256: String,
}

// ---------------------------------------------------------------- worker

/// One volume, in the worker process: load, segment, write the report.
/// Stdout carries `{"loaded":true}` once the model is loaded and a final
/// `{"ok":true}` or `{"error":"..."}` line; logs go to stderr.
pub(super) fn worker(a: &WatchArgs, job: &str) -> ExitCode {
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
        fsio::write_atomic(
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
            say(&json!({"error": crate::error_chain(&e), "transient": super::is_transient(&e)}));
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
    /// The results could not be written for a passing reason (a full or
    /// read-only outbox): the input is tried again later.
    Transient(String),
}

pub(crate) trait Runner {
    fn run(&mut self, job: &WorkerJob, stopping: &dyn Fn() -> bool) -> RunResult;
}

/// Runs each volume in a child `infl8 watch ... --worker-job`.
pub(super) struct ChildRunner {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    pub timeout_s: f64,
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
        let mut transient = false;
        let mut handle = |line: String, loaded_at: &mut Option<Instant>| {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["loaded"] == json!(true) {
                    *loaded_at = Some(Instant::now());
                }
                if let Some(e) = v["error"].as_str() {
                    error = Some(e.to_string());
                    transient = v["transient"] == json!(true);
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
        if transient {
            return RunResult::Transient(reason);
        }
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
pub(super) fn error_kind(reason: &str) -> &'static str {
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
