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

mod claim;
mod journal;
mod service;
mod status;
mod worker;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Args;
use infl8_core::fsio;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tracing::info;

use crate::commands::settings_for;
use crate::flags::{ModelArgs, PostprocessArgs, RuntimeArgs};
use crate::isolate::WorkerCommand;
use service::{Options, Service};
use worker::ChildRunner;

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
    /// Process again an input that failed before when it is dropped into
    /// the inbox again (without it such an input is filed under failed/
    /// again, with a warning).
    #[arg(long)]
    pub retry_failed: bool,
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

/// Set by SIGTERM / SIGINT.
pub(crate) static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

pub fn run(a: WatchArgs) -> Result<ExitCode> {
    if let Some(job) = &a.worker_job {
        return Ok(worker::worker(&a, job));
    }
    if a.status {
        return status::print_status(&a.outbox);
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
    let check = {
        let (settings, model) = (settings.clone(), model.clone());
        std::thread::spawn(move || infl8_core::engine::open(&settings, &model).map(drop))
    };
    // A model can take many seconds to load: a SIGTERM meanwhile stops the
    // service at once (nothing is written yet; the thread dies with it).
    while !check.is_finished() {
        if signalled() {
            info!("stopped before starting");
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match check.join() {
        Ok(r) => r?,
        Err(_) => bail!("loading the model {} panicked", model.display()),
    }
    info!(
        load_s = format!("{:.2}", t.elapsed().as_secs_f64()),
        "model checked; each volume loads it again in its worker"
    );
    let Some(model_sha256) = sha256_file(&model, &signalled)? else {
        info!("stopped before starting");
        return Ok(ExitCode::SUCCESS);
    };
    let runner = ChildRunner {
        worker: WorkerCommand {
            exe: std::env::current_exe().context("cannot find the infl8 executable")?,
            args: std::env::args_os().skip(1).collect(),
            timeout: settings.limits.timeout(),
            stop_grace: Some(Duration::from_secs_f64(settings.watch.stop_grace_s)),
        },
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
        retry_failed: a.retry_failed,
        max_input_bytes: settings.limits.max_input_bytes,
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

/// The sha256 of what `r` reads, or None once `stop` says so (checked
/// every MiB: hashing a large file must not hold up a SIGTERM).
pub(crate) fn sha256_of(
    path: &Path,
    r: &mut dyn Read,
    stop: &dyn Fn() -> bool,
) -> Result<Option<String>> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if stop() {
            return Ok(None);
        }
        let n = r
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Some(format!("{:x}", h.finalize())))
}

/// [`sha256_of`] a file.
pub(crate) fn sha256_file(path: &Path, stop: &dyn Fn() -> bool) -> Result<Option<String>> {
    let mut f = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    sha256_of(path, &mut f, stop)
}

/// An error of the place written to (a full, read-only or forbidden
/// outbox), not of the input: retried later, never held against it.
pub(crate) fn is_transient(e: &anyhow::Error) -> bool {
    use infl8_core::nifti_io::NiftiIoError;
    use infl8_core::segment::SegmentError;
    // The outermost error that says decides: an input's read error wraps
    // an io::Error that alone would look like the outbox's.
    e.chain()
        .find_map(|c| {
            if let Some(w) = c.downcast_ref::<fsio::WriteError>() {
                return Some(w.is_transient());
            }
            if let Some(s) = c.downcast_ref::<SegmentError>() {
                return Some(matches!(s, SegmentError::Nifti(n) if n.is_transient_write()));
            }
            if let Some(n) = c.downcast_ref::<NiftiIoError>() {
                return Some(n.is_transient_write());
            }
            if let Some(j) = c.downcast_ref::<journal::JournalError>() {
                return Some(
                    matches!(j, journal::JournalError::Io { source, .. } if fsio::is_transient_io(source)),
                );
            }
            c.downcast_ref::<std::io::Error>()
                .map(fsio::is_transient_io)
        })
        .unwrap_or(false)
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

/// Process-wide (the signal handler's flag): tests drive the service with
/// their own stop flag instead.
fn signalled() -> bool {
    SIGNALLED.load(Ordering::SeqCst)
}
