//! One volume in a child process of this binary, and the parent's side of
//! it: `watch` runs every volume this way, `segment` when asked (and by
//! default when `limits.timeout_s` is set).
//!
//! A plugin is native code: it can abort, hang inside one call, or corrupt
//! memory, and no in-process check stops that. In a child, an abort ends
//! only the child (the parent names the signal and the plugin), and a hang
//! ends when the parent kills it at the deadline.
//!
//! The child speaks one JSON object per line on its stdout (logs go to
//! stderr): [`Said::Loaded`] once the model is loaded (the volume's clock
//! starts there), then a final `{"ok": ...}` or `{"error": ...}`.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};

/// Past the volume's deadline, what a worker gets to notice it between two
/// backend calls and stop with its own error before it is killed.
pub(crate) const KILL_GRACE: Duration = Duration::from_secs(1);

/// How to start a worker: this binary with the parent's arguments and a
/// hidden flag carrying the job.
pub(crate) struct WorkerCommand {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    /// `limits.timeout_s`, counted from the worker's `loaded` line.
    pub timeout: Option<Duration>,
    /// Once the parent is asked to stop, how long the worker may still
    /// take before it is killed (`None`: as long as it needs).
    pub stop_grace: Option<Duration>,
}

/// Which backend a worker loaded the model on, as it said.
#[derive(Clone, Debug, Default)]
pub(crate) struct Loaded {
    pub at: Option<Instant>,
    pub backend: String,
    pub library: String,
}

/// What the worker said and how it ended.
#[derive(Debug)]
pub(crate) struct WorkerEnd {
    /// The worker's process id (its temporary files carry it).
    pub pid: u32,
    /// `None` when the worker died or was killed before loading the model.
    pub loaded: Option<Loaded>,
    /// The payload of its final `{"ok": ...}`.
    pub ok: Option<Value>,
    /// Its final `{"error": ...}` object.
    pub error: Option<Value>,
    pub how: Ended,
}

#[derive(Debug)]
pub(crate) enum Ended {
    Exited(ExitStatus),
    /// Killed by the parent this long after loading the model.
    TimedOut(Duration),
    /// Killed by the parent: asked to stop, it did not finish within its
    /// grace.
    Stopped,
}

impl WorkerEnd {
    /// The signal that ended the worker, unless the parent killed it.
    pub(crate) fn signal(&self) -> Option<i32> {
        match &self.how {
            Ended::Exited(s) => s.signal(),
            Ended::TimedOut(_) | Ended::Stopped => None,
        }
    }

    /// The worker's own error message.
    pub(crate) fn error_message(&self) -> Option<&str> {
        self.error.as_ref().and_then(|e| e["error"].as_str())
    }

    /// Why a worker that died from a signal died, naming the backend and
    /// its library when the model had loaded.
    pub(crate) fn crash_reason(&self, input: &std::path::Path, sig: i32) -> String {
        let what = match &self.loaded {
            Some(l) if l.library.is_empty() => format!("while running backend {}", l.backend),
            Some(l) => format!("while running backend {} (plugin {})", l.backend, l.library),
            None => "while loading the model".to_owned(),
        };
        format!(
            "{}: the worker process died from signal {sig} ({}) {what}",
            input.display(),
            signal_name(sig)
        )
    }

    /// Why a worker the parent killed at its deadline was killed.
    pub(crate) fn timeout_reason(&self, input: &std::path::Path, timeout_s: f64) -> String {
        let after = match self.how {
            Ended::TimedOut(d) => d.as_secs_f64(),
            Ended::Exited(_) | Ended::Stopped => timeout_s,
        };
        let backend = self
            .loaded
            .as_ref()
            .map(|l| format!(" on backend {}", l.backend))
            .unwrap_or_default();
        format!(
            "{}: timed out: the volume took longer than limits.timeout_s = {timeout_s} s{backend}; \
             its worker was killed {after:.1} s after the model loaded",
            input.display()
        )
    }
}

impl WorkerCommand {
    /// Runs one job (`flag JSON` appended to the arguments) to its end.
    /// Once `stop` says so, the worker gets `stop_grace` to finish, then it
    /// is killed ([`Ended::Stopped`]). Errors are the parent's own (the
    /// worker could not be started or waited for).
    pub(crate) fn run(&self, flag: &str, job: &str, stop: &dyn Fn() -> bool) -> Result<WorkerEnd> {
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.args)
            .arg(flag)
            .arg(job)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own process group: a terminal's Ctrl-C reaches only the
            // parent, which decides what happens to the volume.
            .process_group(0);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // The worker dies with the parent (kill -9 included), so no
                // orphan keeps writing after a restart.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent decides when a volume stops: a SIGTERM sent to
                // every process (systemd's KillMode=control-group) must not
                // cut short the volume a service lets finish. Ignored
                // dispositions survive exec, so there is no window before
                // the worker could ignore it itself.
                libc::signal(libc::SIGTERM, libc::SIG_IGN);
                libc::signal(libc::SIGINT, libc::SIG_IGN);
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("cannot start a worker process")?;
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
        let mut end = WorkerEnd {
            pid: child.id(),
            loaded: None,
            ok: None,
            error: None,
            how: Ended::Exited(ExitStatus::from_raw(0)),
        };
        let take = |line: String, end: &mut WorkerEnd| {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                return;
            };
            if v["loaded"] == json!(true) {
                end.loaded = Some(Loaded {
                    at: Some(Instant::now()),
                    backend: v["backend"].as_str().unwrap_or_default().to_owned(),
                    library: v["library"].as_str().unwrap_or_default().to_owned(),
                });
            }
            if let Some(ok) = v.get("ok") {
                end.ok = Some(ok.clone());
            }
            if v.get("error").is_some() {
                end.error = Some(v);
            }
        };
        let mut stop_at: Option<Instant> = None;
        let status = loop {
            while let Ok(line) = rx.try_recv() {
                take(line, &mut end);
            }
            if let Some(s) = child.try_wait().context("cannot wait for the worker")? {
                break s;
            }
            let since_load = end.loaded.as_ref().and_then(|l| l.at).map(|t| t.elapsed());
            if let (Some(limit), Some(elapsed)) = (self.timeout, since_load)
                && elapsed > limit + KILL_GRACE
            {
                kill_group(&mut child, end.pid)?;
                end.how = Ended::TimedOut(elapsed);
                break ExitStatus::from_raw(libc::SIGKILL);
            }
            if let Some(grace) = self.stop_grace
                && stop()
            {
                let since = *stop_at.get_or_insert_with(Instant::now);
                if since.elapsed() >= grace {
                    kill_group(&mut child, end.pid)?;
                    end.how = Ended::Stopped;
                    break ExitStatus::from_raw(libc::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(r) = reader {
            let _ = r.join();
        }
        while let Ok(line) = rx.try_recv() {
            take(line, &mut end);
        }
        if matches!(end.how, Ended::Exited(_)) {
            end.how = Ended::Exited(status);
        }
        Ok(end)
    }
}

/// One line of the worker protocol on stdout.
pub(crate) fn say(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// The worker's `loaded` line.
pub(crate) fn say_loaded(backend: &str, library: &std::path::Path) {
    say(&json!({
        "loaded": true,
        "backend": backend,
        "library": library.display().to_string(),
    }));
}

/// The usual name of a signal, for messages.
pub(crate) fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGABRT => "SIGABRT, an abort",
        libc::SIGSEGV => "SIGSEGV, an invalid memory access",
        libc::SIGBUS => "SIGBUS, a bad memory access",
        libc::SIGFPE => "SIGFPE, an arithmetic fault",
        libc::SIGILL => "SIGILL, an illegal instruction",
        libc::SIGKILL => "SIGKILL, killed",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "a signal",
    }
}

/// Kills the worker's whole process group and reaps the worker. The whole
/// group: a helper process the plugin started would otherwise keep the
/// pipe open and the parent waiting.
fn kill_group(child: &mut std::process::Child, pid: u32) -> Result<()> {
    // SAFETY: a plain syscall on the worker's own group (its pid is its
    // group's id: `process_group(0)`).
    unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
    let _ = child.kill();
    child.wait().context("cannot wait for the worker")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, timeout: Option<Duration>) -> WorkerEnd {
        // `sh -c SCRIPT FLAG JOB`: the flag and job become $0 and $1.
        WorkerCommand {
            exe: "sh".into(),
            args: vec!["-c".into(), script.into()],
            timeout,
            stop_grace: None,
        }
        .run("--job", "{}", &|| false)
        .unwrap()
    }

    #[test]
    fn a_worker_that_reports_ok_is_read_back() {
        let e = sh(
            r#"echo '{"loaded":true,"backend":"tract","library":"/l.so"}'; echo '{"ok":{"n":3}}'"#,
            None,
        );
        assert!(matches!(e.how, Ended::Exited(s) if s.success()));
        assert_eq!(e.loaded.unwrap().backend, "tract");
        assert_eq!(e.ok.unwrap()["n"], 3);
    }

    #[test]
    fn an_abort_names_the_signal_and_the_plugin() {
        let e = sh(
            r#"echo '{"loaded":true,"backend":"x","library":"/p/libx.so"}'; kill -ABRT $$"#,
            None,
        );
        let sig = e.signal().unwrap();
        let r = e.crash_reason(std::path::Path::new("in.nii"), sig);
        assert!(
            r.contains("SIGABRT") && r.contains("/p/libx.so") && r.contains("in.nii"),
            "{r}"
        );
    }

    #[test]
    fn a_hang_is_killed_a_grace_second_after_its_deadline() {
        let t = Instant::now();
        let e = sh(
            r#"echo '{"loaded":true,"backend":"x"}'; sleep 30"#,
            Some(Duration::from_millis(300)),
        );
        assert!(matches!(e.how, Ended::TimedOut(_)), "{e:?}");
        let took = t.elapsed();
        assert!(took < Duration::from_secs(10), "{took:?}");
        let r = e.timeout_reason(std::path::Path::new("in.nii"), 0.3);
        assert!(
            r.contains("limits.timeout_s") && r.contains("in.nii"),
            "{r}"
        );
    }

    #[test]
    fn asked_to_stop_a_worker_gets_its_grace_then_is_killed() {
        let t = Instant::now();
        let e = WorkerCommand {
            exe: "sh".into(),
            args: vec![
                "-c".into(),
                r#"echo '{"loaded":true,"backend":"x"}'; sleep 30"#.into(),
            ],
            timeout: None,
            stop_grace: Some(Duration::from_millis(300)),
        }
        .run("--job", "{}", &|| t.elapsed() > Duration::from_millis(200))
        .unwrap();
        assert!(matches!(e.how, Ended::Stopped), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }

    #[test]
    fn the_clock_starts_only_once_the_model_is_loaded() {
        // A slow load (1.5 s) under a 0.3 s limit is not a timeout.
        let e = sh(
            r#"sleep 1.5; echo '{"loaded":true,"backend":"x"}'; echo '{"ok":1}'"#,
            Some(Duration::from_millis(300)),
        );
        assert!(matches!(e.how, Ended::Exited(s) if s.success()), "{e:?}");
    }
}
