//! One volume in a worker process, and the supervisor's side of it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use infl8_core::failure::FailureKind;
use infl8_core::fsio;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{WatchArgs, now_rfc3339};
use crate::commands::settings_for;
use crate::isolate::{Ended, WorkerCommand, say, say_loaded};

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
        let prepared = infl8_core::engine::open(&settings, model)?;
        let load_s = t0.elapsed().as_secs_f64();
        say_loaded(&prepared.backend, &prepared.library);
        let t1 = Instant::now();
        let limits = settings.limits.read_limits();
        let r = prepared.within_deadline(&job.input, |s| {
            s.segment_file(&job.input, &job.output, None, &limits, &|_, _| {})
        })?;
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
            say(&json!({
                "error": crate::error_chain(&e),
                "transient": super::is_transient(&e),
                "kind": FailureKind::of_chain(e.chain()),
            }));
            ExitCode::FAILURE
        }
    }
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
    pub worker: WorkerCommand,
    pub timeout_s: f64,
}

impl Runner for ChildRunner {
    fn run(&mut self, job: &WorkerJob, stopping: &dyn Fn() -> bool) -> RunResult {
        let job_json = match serde_json::to_string(job) {
            Ok(j) => j,
            Err(e) => return RunResult::Service(e.to_string()),
        };
        let started = Instant::now();
        let end = match self.worker.run("--worker-job", &job_json, stopping) {
            Ok(end) => end,
            Err(e) => return RunResult::Service(format!("{e:#}")),
        };
        tracing::debug!(wall_s = started.elapsed().as_secs_f64(), "worker finished");
        if let Ended::Stopped = end.how {
            return RunResult::Interrupted;
        }
        if let Ended::TimedOut(_) = end.how {
            return RunResult::Failed {
                kind: "timeout",
                reason: end.timeout_reason(&job.input, self.timeout_s),
            };
        }
        if let Ended::Exited(status) = end.how
            && status.success()
        {
            return RunResult::Ok;
        }
        if let Some(sig) = end.signal() {
            if stopping() && matches!(sig, libc::SIGTERM | libc::SIGINT | libc::SIGKILL) {
                return RunResult::Interrupted;
            }
            return RunResult::Failed {
                kind: "crashed",
                reason: end.crash_reason(&job.input, sig),
            };
        }
        let reason = match (end.error_message(), &end.how) {
            (Some(m), _) => m.to_owned(),
            (None, Ended::Exited(status)) => format!("the worker exited with {status}"),
            (None, Ended::TimedOut(_) | Ended::Stopped) => "the worker was killed".to_owned(),
        };
        if end
            .error
            .as_ref()
            .is_some_and(|e| e["transient"] == json!(true))
        {
            return RunResult::Transient(reason);
        }
        if end.loaded.is_none() {
            return RunResult::Service(format!("the worker could not load the model: {reason}"));
        }
        RunResult::Failed {
            kind: journal_kind(end.error.as_ref()),
            reason,
        }
    }
}

/// The journal's failure kind for a worker's `{"error": ...}` line: the
/// [`FailureKind`] the worker read off its error's type, or `error` when
/// the error was of no type the runtime classifies.
pub(super) fn journal_kind(error: Option<&serde_json::Value>) -> &'static str {
    error
        .and_then(|e| serde_json::from_value::<FailureKind>(e["kind"].clone()).ok())
        .map_or("error", FailureKind::as_str)
}
