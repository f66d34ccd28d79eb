//! `infl8 plugin check`: the conformance kit for backend plugins.
//!
//! The checks ([`infl8_conformance`]) run in a child process (this binary,
//! re-invoked with a hidden flag) that reports each check as a JSON line. A
//! plugin that crashes or hangs takes only the child down: the check in
//! progress is failed with the reason, and a new child resumes after it.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use infl8_conformance::{CheckResult, Event, Options, Outcome};

#[derive(Subcommand, Debug)]
pub enum PluginCommand {
    /// Check every backend of a plugin library: ABI version and struct
    /// sizes, metadata, a reference model against the kit's own evaluator
    /// at batch 1 and N, error paths, concurrent runs, crash containment.
    /// A backend that cannot run on this machine (no GPU, no runtime
    /// library) is skipped with the reason.
    Check(CheckArgs),
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The plugin library (`libinfl8_NAME.so`).
    pub library: PathBuf,
    /// Check only this backend (repeatable); the others are reported as skipped.
    #[arg(long = "backend", value_name = "NAME")]
    pub backends: Vec<String>,
    /// Fail a backend that cannot run on this machine instead of skipping it.
    #[arg(long)]
    pub require_all: bool,
    /// Largest accepted |difference| from the reference output.
    #[arg(long, default_value_t = 1e-4)]
    pub tolerance: f32,
    /// Batch size of the batch-N run.
    #[arg(long, default_value_t = 3)]
    pub batch: usize,
    /// Threads running the model at once in the concurrency check.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Seconds one check may take before the plugin counts as hung.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Settings file (firmware profile) whose backend options are used.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Also write the results as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Internal: run the checks from this index in this process, as JSON lines.
    #[arg(long, hide = true, value_name = "INDEX")]
    pub child_start: Option<usize>,
}

pub fn run(c: PluginCommand) -> Result<ExitCode> {
    match c {
        PluginCommand::Check(a) => match a.child_start {
            Some(start) => child(&a, start),
            None => check(&a),
        },
    }
}

fn options(a: &CheckArgs, start: usize) -> Options {
    Options {
        library: a.library.clone(),
        backends: a.backends.clone(),
        require_all: a.require_all,
        tolerance: a.tolerance,
        batch: a.batch,
        threads: a.threads,
        config: a.config.clone(),
        start,
    }
}

fn child(a: &CheckArgs, start: usize) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut write_error = None;
    infl8_conformance::run(&options(a, start), &mut |event| {
        let mut out = stdout.lock();
        // Flushed line by line: the parent must see a check start before
        // the plugin gets a chance to crash in it.
        let line = serde_json::to_string(&event).unwrap_or_default();
        if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            write_error.get_or_insert(e);
        }
    });
    match write_error {
        Some(e) => Err(e).context("cannot report to the parent process"),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// Most child processes one check run may start (one per crash or hang).
const MAX_CHILDREN: usize = 64;

enum Line {
    Event(Box<Event>),
    Garbage(String),
    Closed,
}

fn check(a: &CheckArgs) -> Result<ExitCode> {
    if !a.library.exists() {
        bail!("plugin library {} does not exist", a.library.display());
    }
    if a.batch < 2 {
        bail!("--batch must be at least 2 (the batch-N run)");
    }
    let exe = std::env::current_exe().context("cannot find the infl8 executable")?;
    let mut results: Vec<CheckResult> = Vec::new();
    let mut start = 0;
    let mut notes: Vec<String> = Vec::new();
    let mut children = 0;
    'children: loop {
        children += 1;
        if children > MAX_CHILDREN {
            notes.push(format!(
                "stopped after {MAX_CHILDREN} crashed or hung processes"
            ));
            break;
        }
        let mut cmd = Command::new(&exe);
        cmd.arg("plugin").arg("check").arg(&a.library);
        for b in &a.backends {
            cmd.arg("--backend").arg(b);
        }
        if a.require_all {
            cmd.arg("--require-all");
        }
        if let Some(c) = &a.config {
            cmd.arg("--config").arg(c);
        }
        cmd.args(["--tolerance", &a.tolerance.to_string()])
            .args(["--batch", &a.batch.to_string()])
            .args(["--threads", &a.threads.to_string()])
            .args(["--child-start", &start.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let mut proc = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let (tx, rx) = mpsc::channel();
        let stdout = proc.stdout.take().context("no child stdout")?;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let msg = match serde_json::from_str::<Event>(&line) {
                    Ok(e) => Line::Event(Box::new(e)),
                    Err(_) => Line::Garbage(line),
                };
                if tx.send(msg).is_err() {
                    return;
                }
            }
            let _ = tx.send(Line::Closed);
        });
        let stderr = proc.stderr.take().context("no child stderr")?;
        let stderr_tail = std::thread::spawn(move || {
            let mut tail: Vec<String> = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tail.len() == 20 {
                    tail.remove(0);
                }
                tail.push(line);
            }
            tail
        });
        let mut current: Option<(usize, String, Option<String>)> = None;
        let mut saw_any = false;
        loop {
            match rx.recv_timeout(Duration::from_secs(a.timeout)) {
                Ok(Line::Event(e)) => match *e {
                    Event::Start {
                        index,
                        name,
                        backend,
                    } => {
                        saw_any = true;
                        current = Some((index, name, backend));
                    }
                    Event::Result(r) => {
                        saw_any = true;
                        current = None;
                        start = r.index + 1;
                        print_row(&r);
                        results.push(r);
                    }
                    Event::Done => {
                        let _ = proc.wait();
                        let _ = stderr_tail.join();
                        break 'children;
                    }
                },
                Ok(Line::Garbage(line)) => {
                    // A plugin printing to stdout: keep it, it is not ours.
                    notes.push(format!("plugin wrote to stdout: {line}"));
                }
                Ok(Line::Closed) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = proc.wait().context("waiting for the check process")?;
                    let tail = stderr_tail.join().unwrap_or_default();
                    let how = describe_exit(status);
                    let Some((index, name, backend)) = current.take() else {
                        notes.push(format!(
                            "the check process {how} {}",
                            if saw_any {
                                "between checks"
                            } else {
                                "before its first check"
                            }
                        ));
                        notes.extend(tail.into_iter().map(|l| format!("  stderr: {l}")));
                        if saw_any {
                            continue 'children;
                        }
                        break 'children;
                    };
                    let mut detail = format!("the plugin {how} during this check (contained)");
                    if let Some(last) = tail.last() {
                        detail.push_str(&format!("; last stderr line: {last}"));
                    }
                    let r = CheckResult {
                        index,
                        name,
                        backend,
                        outcome: Outcome::Fail,
                        detail,
                    };
                    print_row(&r);
                    results.push(r);
                    start = index + 1;
                    if !saw_any {
                        break 'children;
                    }
                    continue 'children;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = proc.kill();
                    let _ = proc.wait();
                    let Some((index, name, backend)) = current.take() else {
                        notes.push(format!(
                            "the check process said nothing for {} s; stopped",
                            a.timeout
                        ));
                        break 'children;
                    };
                    let r = CheckResult {
                        index,
                        name,
                        backend,
                        outcome: Outcome::Fail,
                        detail: format!(
                            "no answer within {} s: the plugin hangs (process killed)",
                            a.timeout
                        ),
                    };
                    print_row(&r);
                    results.push(r);
                    start = index + 1;
                    continue 'children;
                }
            }
        }
    }
    let count = |o: Outcome| results.iter().filter(|r| r.outcome == o).count();
    let (pass, fail, skip) = (
        count(Outcome::Pass),
        count(Outcome::Fail),
        count(Outcome::Skip),
    );
    // Skipped backends prove nothing: at least one must have run here.
    let backend_passed = results
        .iter()
        .any(|r| r.backend.is_some() && r.outcome == Outcome::Pass);
    if !backend_passed {
        notes.push("no backend of this library ran its checks here".into());
    }
    let conforms = fail == 0 && backend_passed && notes.iter().all(|n| !n.starts_with("the check"));
    for n in &notes {
        println!("note: {n}");
    }
    println!(
        "{}: {pass} of {} checks passed, {skip} skipped, {fail} failed: {}",
        a.library.display(),
        results.len(),
        if conforms {
            "conforms"
        } else {
            "DOES NOT CONFORM"
        }
    );
    if let Some(path) = &a.json {
        let doc = serde_json::json!({
            "library": a.library,
            "conforms": conforms,
            "passed": pass, "failed": fail, "skipped": skip,
            "notes": notes,
            "checks": results,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(if conforms {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_row(r: &CheckResult) {
    let verdict = match r.outcome {
        Outcome::Pass => "pass",
        Outcome::Fail => "FAIL",
        Outcome::Skip => "skip",
    };
    println!(
        "{verdict:4}  {:<14} {:<36} {}",
        r.backend.as_deref().unwrap_or("(library)"),
        r.name,
        r.detail
    );
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            let name = match sig {
                4 => " (SIGILL)",
                6 => " (SIGABRT)",
                7 => " (SIGBUS)",
                8 => " (SIGFPE)",
                9 => " (SIGKILL)",
                11 => " (SIGSEGV)",
                _ => "",
            };
            return format!("crashed the process with signal {sig}{name}");
        }
    }
    match status.code() {
        Some(code) => format!("ended the process with exit code {code}"),
        None => "ended the process".into(),
    }
}
