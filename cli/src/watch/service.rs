//! The supervisor: scans the inbox, journals each step, runs each volume
//! through a [`Runner`] and files the input (see the crash invariant in the
//! module docs of `watch`).

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use infl8_core::config::WatchSettings;
use infl8_core::fsio;
use serde_json::{Value, json};
use tracing::{error, info, warn};

use super::claim::{Claimed, claim};
use super::journal::{Item, Journal, Key, Outcome, Record, State};
use super::status::Status;
use super::worker::{RunResult, Runner, WorkerJob};
use super::{SIGNALLED, is_transient, now_rfc3339, sha256_of};
use crate::commands::{is_nifti, nifti_stem};

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
    /// `--retry-failed`: process failed inputs again (once per start).
    pub retry_failed: bool,
    /// `limits.max_input_bytes`: larger inputs fail from their size alone.
    pub max_input_bytes: u64,
}

/// When a file's size and mtime were first seen as they are now.
struct Seen {
    size: u64,
    mtime_ns: u64,
    since: Instant,
    /// The file could not be read: not tried again before this, so one
    /// unreadable file neither spins the loop nor holds up the files after it.
    retry_at: Option<Instant>,
    /// Transient failures in a row (the backoff's exponent).
    deferrals: u32,
}

impl Seen {
    /// The file as this scan sees it, from now on.
    fn first(c: &Candidate, now: Instant) -> Seen {
        Seen {
            size: c.size,
            mtime_ns: c.mtime_ns,
            since: now,
            retry_at: None,
            deferrals: 0,
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

/// Reads an input's checksum; `None` when asked to stop first.
type HashFn = fn(&Path, &mut dyn std::io::Read, &dyn Fn() -> bool) -> Result<Option<String>>;

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
    /// Failed inputs tried again since the start (`--retry-failed`).
    retried: HashSet<Key>,
    /// Reads an input's checksum (tests replace it to fake unreadable files).
    hash: HashFn,
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
            retried: HashSet::new(),
            hash: sha256_of,
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
                if fsio::is_temporary(&e.file_name()) {
                    warn!(file = %e.path().display(), "removing a partial file left by a crash");
                    fs::remove_file(e.path())
                        .with_context(|| format!("cannot remove {}", e.path().display()))?;
                }
            }
        }
        Ok(())
    }

    /// The temporary files of these results, which only a worker that is
    /// not running writes.
    fn remove_temporaries_of(&self, results: &[&Path]) {
        let prefixes: Vec<String> = results
            .iter()
            .filter_map(|p| p.file_name())
            .map(fsio::temporary_prefix)
            .collect();
        let Ok(entries) = fs::read_dir(&self.o.outbox) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            if fsio::is_temporary(&name)
                && prefixes
                    .iter()
                    .any(|p| name.to_string_lossy().starts_with(p.as_str()))
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
                if let Err(e) = fsio::write_atomic(&path, &b) {
                    warn!("cannot write the status file: {e}");
                }
            }
            Err(e) => warn!("cannot encode the status: {e}"),
        }
    }

    /// Sleeps up to `d`, less when asked to stop.
    fn nap(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stopping() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs until asked to stop (signal or `stop`), finishing the current
    /// volume first. A full, read-only or forbidden outbox is waited out
    /// (with a growing pause) rather than ending the service.
    pub(crate) fn run(&mut self) -> Result<()> {
        info!(
            inbox = %self.o.inbox.display(),
            outbox = %self.o.outbox.display(),
            "watching"
        );
        self.write_status();
        let mut recovered = false;
        let mut pause = 0u32;
        let result = (|| -> Result<()> {
            while !self.stopping() {
                let r = if recovered {
                    self.step()
                } else {
                    self.recover().map(|()| {
                        recovered = true;
                        true
                    })
                };
                match r {
                    Ok(busy) => {
                        pause = 0;
                        if !busy {
                            self.nap(Duration::from_millis(self.o.watch.poll_ms));
                        }
                    }
                    Err(e) if is_transient(&e) => {
                        let wait = backoff(pause);
                        pause += 1;
                        warn!(
                            retry_s = wait.as_secs(),
                            "the outbox cannot be written now, waiting: {}",
                            crate::error_chain(&e)
                        );
                        self.nap(wait);
                    }
                    Err(e) => return Err(e),
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

    /// Finishes inputs the journal shows as interrupted by a crash. One
    /// that cannot be finished is recorded as failed, so that a restart
    /// never meets it again: recovery cannot loop on one entry.
    fn recover(&mut self) -> Result<()> {
        let interrupted: Vec<Item> = self.state.interrupted().into_iter().cloned().collect();
        for item in interrupted {
            if self.stopping() {
                return Ok(());
            }
            match self.recover_one(&item) {
                Ok(()) => {}
                Err(e) if is_transient(&e) || self.crash_at.is_some() => return Err(e),
                Err(e) => {
                    let reason = format!(
                        "{}: cannot resume it: {}",
                        item.key.name,
                        crate::error_chain(&e)
                    );
                    self.fail(&item.key, &item.slot, item.attempts, "error", &reason)?;
                }
            }
        }
        Ok(())
    }

    fn recover_one(&mut self, item: &Item) -> Result<()> {
        let path = self.o.inbox.join(&item.key.name);
        let stop = self.stop_flag();
        let claimed = match claim(&path) {
            Ok(Claimed::Ours(f)) => Some(f),
            Ok(Claimed::Busy) => {
                // Another service has it now; ours may resume it later.
                info!(input = %item.key.name, "claimed by another service, leaving it");
                return Ok(());
            }
            Ok(Claimed::Gone) | Err(_) => None,
        };
        let meta = claimed.as_ref().and_then(|f| f.metadata().ok());
        let mut changed = false;
        let same = match (claimed, &meta) {
            (Some(mut f), Some(m)) if m.is_file() => {
                let sha = if self.over_limit(m.len()) {
                    Some(unhashed_key(m.len(), mtime_ns(m)))
                } else {
                    (self.hash)(&path, &mut f, &stop)?
                };
                match sha {
                    None => return Ok(()),
                    Some(sha) if sha == item.key.sha256 => Some(f),
                    Some(_) => {
                        changed = true;
                        None
                    }
                }
            }
            _ => None,
        };
        info!(input = %item.key.name, attempts = item.attempts, "resuming an interrupted volume");
        if let (Some(claim), Some(m)) = (same, meta) {
            let c = Candidate {
                name: item.key.name.clone(),
                path,
                size: m.len(),
                mtime_ns: mtime_ns(&m),
            };
            self.process(&c, &item.key.sha256, claim).map(drop)
        } else if self.report_matches(&item.slot, &item.key.sha256) {
            self.record_done(&item.key, &item.slot, 0.0)
        } else if changed {
            // Another file under the same name: its own input, not this
            // one's to fail (or to move to failed/).
            let reason = format!(
                "{}: the file changed before it was processed",
                item.key.name
            );
            info!(input = %item.key.name, "{reason}; the new content is a new input");
            self.supersede(&item.key, &reason);
            Ok(())
        } else {
            let reason = format!(
                "{}: the input left the inbox (or changed) before it was processed",
                item.key.name
            );
            self.fail(&item.key, &item.slot, item.attempts, "vanished", &reason)
        }
    }

    fn stop_flag(&self) -> impl Fn() -> bool + use<R> {
        let stop = self.o.stop.clone();
        move || stop.load(Ordering::SeqCst) || SIGNALLED.load(Ordering::SeqCst)
    }

    /// Larger than `limits.max_input_bytes`: refused from its size alone,
    /// never read (a sparse file can claim terabytes).
    fn over_limit(&self, size: u64) -> bool {
        self.o.max_input_bytes > 0 && size > self.o.max_input_bytes
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
            if let Some(item) = self.state.finished_as(&c.name, c.size, c.mtime_ns) {
                // Finished: the service died before the move, or inputs stay
                // in place. Left in place, it is never processed again (but
                // once per start with --retry-failed if it failed). To be
                // moved, it is hashed first: a new file of the same name,
                // size and mtime (a copy that kept its mtime) is a new input,
                // not one to file under done/ unread.
                let retry = self.o.retry_failed
                    && matches!(item.outcome, Some(Outcome::Failed { .. }))
                    && !self.retried.contains(&item.key);
                if (self.o.watch.move_inputs || retry) && ready.is_none() && !retry_later {
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
        let mut file = match claim(&c.path) {
            Ok(Claimed::Ours(f)) => f,
            Ok(Claimed::Busy) => {
                info!(input = %c.name, "another service is on it; trying the others");
                self.retry_in(&c, CLAIMED_RETRY, 0);
                return Ok(true);
            }
            // Gone between listing and claiming: not ours to judge.
            Ok(Claimed::Gone) => return Ok(true),
            Err(e) => {
                let e = anyhow::Error::new(e).context(format!("cannot open {}", c.path.display()));
                self.unreadable(&c, &e);
                return Ok(true);
            }
        };
        let sha = if self.over_limit(c.size) {
            unhashed_key(c.size, c.mtime_ns)
        } else {
            let stop = self.stop_flag();
            match (self.hash)(&c.path, &mut file, &stop) {
                Ok(Some(sha)) => sha,
                // Stopping: the file is left for the next start.
                Ok(None) => return Ok(true),
                Err(e) => {
                    self.unreadable(&c, &e);
                    return Ok(true);
                }
            }
        };
        // Still being written: wait for it to settle again.
        match file.metadata() {
            Ok(m) if m.len() == c.size && mtime_ns(&m) == c.mtime_ns => {}
            _ => {
                self.seen.remove(&c.name);
                self.renamed.remove(&c.name);
                return Ok(true);
            }
        }
        match self.process(&c, &sha, file)? {
            Processed::Finished => {
                self.seen.remove(&c.name);
                self.renamed.remove(&c.name);
            }
            Processed::Deferred => {
                let n = self.seen.get(&c.name).map_or(0, |s| s.deferrals);
                self.retry_in(&c, backoff(n), n + 1);
            }
            Processed::Changed => {
                self.seen.remove(&c.name);
                self.renamed.remove(&c.name);
            }
        }
        Ok(true)
    }

    /// Leaves `c` alone for `wait` (or until it changes).
    fn retry_in(&mut self, c: &Candidate, wait: Duration, deferrals: u32) {
        let now = Instant::now();
        let seen = self
            .seen
            .entry(c.name.clone())
            .or_insert(Seen::first(c, now));
        seen.retry_at = Some(now + wait);
        seen.deferrals = deferrals;
    }

    fn unreadable(&mut self, c: &Candidate, e: &anyhow::Error) {
        if fs::metadata(&c.path).is_ok() {
            warn!(
                input = %c.name,
                retry_s = UNREADABLE_RETRY.as_secs(),
                "cannot read an inbox file, trying the others: {e:#}"
            );
            self.retry_in(c, UNREADABLE_RETRY, 0);
        }
        // Else it is gone between listing and reading: not ours to judge.
    }

    /// The results of a slot: `<slot>_seg.nii.gz` and `<slot>.report.json`.
    fn slot_paths(&self, slot: &str) -> (PathBuf, PathBuf) {
        (
            self.o.outbox.join(safe_name(slot, "_seg.nii.gz")),
            self.o.outbox.join(safe_name(slot, ".report.json")),
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

    /// Runs one claimed input (the claim is held until it is filed).
    fn process(&mut self, c: &Candidate, sha256: &str, _claim: fs::File) -> Result<Processed> {
        let key = Key {
            name: c.name.clone(),
            sha256: sha256.to_string(),
        };
        let existing = self.state.get(&key).cloned();
        if let Some(item) = &existing {
            match &item.outcome {
                Some(Outcome::Failed { reason }) if self.o.retry_failed => {
                    if !self.retried.insert(key.clone()) {
                        self.finish_move(&key, &item.slot, false)?;
                        return Ok(Processed::Finished);
                    }
                    info!(input = %c.name, "failed before ({reason}); trying it again (--retry-failed)");
                }
                Some(outcome) => {
                    let done = matches!(outcome, Outcome::Done { .. });
                    if let Outcome::Failed { reason } = outcome
                        && self.o.watch.move_inputs
                    {
                        warn!(
                            input = %c.name,
                            "this input failed before ({reason}): filed under failed/ again; \
                             run with --retry-failed to process it again"
                        );
                    }
                    self.finish_move(&key, &item.slot, done)?;
                    return Ok(Processed::Finished);
                }
                None => {
                    // Checked before the attempts: results complete before
                    // the service died on its last allowed attempt are
                    // recorded, not failed as poison next to them.
                    if self.report_matches(&item.slot, sha256) {
                        info!(input = %c.name, "its results were complete before the restart");
                        self.record_done(&key, &item.slot, 0.0)?;
                        return Ok(Processed::Finished);
                    }
                    if item.attempts.saturating_sub(item.deferred) >= self.o.watch.max_attempts {
                        let reason = format!(
                            "{}: the service died {} time(s) while processing it \
                             (watch.max_attempts = {})",
                            c.name, item.attempts, self.o.watch.max_attempts
                        );
                        self.fail(&key, &item.slot, item.attempts, "crashed", &reason)?;
                        return Ok(Processed::Finished);
                    }
                }
            }
        }
        let slot = match &existing {
            Some(item) => item.slot.clone(),
            None => {
                let stem = nifti_stem(std::ffi::OsStr::new(&c.name));
                let stem = fsio::fit_name(&stem, SLOT_STEM_MAX);
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
        if self.over_limit(c.size) {
            let reason = format!(
                "{}: the file is {} bytes, more than the limit of {} (limits.max_input_bytes)",
                c.name, c.size, self.o.max_input_bytes
            );
            self.fail(&key, &slot, attempt, "limit", &reason)?;
            return Ok(Processed::Finished);
        }
        if !is_nifti(&c.path) {
            let reason = format!("{}: not a .nii or .nii.gz file", c.name);
            self.fail(&key, &slot, attempt, "not_nifti", &reason)?;
            return Ok(Processed::Finished);
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
        let stopping = self.stop_flag();
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
                    self.fail(&key, &slot, attempt, "error", &reason)?;
                } else {
                    self.record_done(&key, &slot, t0.elapsed().as_secs_f64())?;
                }
            }
            RunResult::Failed { reason, .. } if changed_since(c) => {
                // What failed (as truncated, say) was a file still being
                // written: failing it would file the complete file under
                // failed/ with the wrong reason.
                warn!(
                    input = %c.name,
                    "it changed while it was processed (still being written?); left in the \
                     inbox to try once it is stable: {reason}"
                );
                self.supersede(&key, &reason);
                return Ok(Processed::Changed);
            }
            RunResult::Failed { kind, reason } => self.fail(&key, &slot, attempt, kind, &reason)?,
            RunResult::Transient(reason) => {
                warn!(
                    input = %c.name,
                    "cannot write its results now, left in the inbox to try again: {reason}"
                );
                self.defer(&key, &reason);
                return Ok(Processed::Deferred);
            }
            RunResult::Interrupted => {
                // Journalled as deferred: a stop is not the input's fault,
                // and must not count towards watch.max_attempts.
                info!(input = %c.name, "stopping: the volume is left for the next start");
                self.defer(&key, "the service stopped before the volume was finished");
            }
            RunResult::Service(reason) => bail!("{reason}"),
        }
        Ok(Processed::Finished)
    }

    /// Journals that `key`'s content is gone from the inbox before it had
    /// results: the file under its name is another input now.
    fn supersede(&mut self, key: &Key, reason: &str) {
        let r = Record::Superseded {
            name: key.name.clone(),
            sha256: key.sha256.clone(),
            reason: reason.to_owned(),
            at: now_rfc3339(),
        };
        self.leave_in_inbox(&r);
    }

    /// Journals that `key` was taken but is left in the inbox for later
    /// (not a failure, and not counted as an attempt the service died on).
    fn defer(&mut self, key: &Key, reason: &str) {
        let r = Record::Deferred {
            name: key.name.clone(),
            sha256: key.sha256.clone(),
            reason: reason.to_owned(),
            at: now_rfc3339(),
        };
        self.leave_in_inbox(&r);
    }

    /// Journals `r` for an input left in the inbox, best effort: the disk
    /// may be the one that is full, and nothing is lost without the line
    /// (the input is still there).
    fn leave_in_inbox(&mut self, r: &Record) {
        match self.journal.append(r) {
            Ok(()) => self.state.apply(r),
            Err(e) => warn!("cannot journal {r:?}: {e}"),
        }
        self.status.current = None;
        self.write_status();
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

    /// Records a poison input: its error report, then `failed`, then the
    /// move. A report that cannot be written for a lasting reason is logged
    /// and left out: a record never stops the service.
    fn fail(
        &mut self,
        key: &Key,
        slot: &str,
        attempt: u32,
        kind: &str,
        reason: &str,
    ) -> Result<()> {
        let report_name = safe_name(slot, &format!("{}.error.json", extension_of(&key.name)));
        let report = self.o.outbox.join("failed").join(&report_name);
        let body = json!({
            "input": key.name,
            "input_sha256": key.sha256,
            "kind": kind,
            "error": reason,
            "attempt": attempt,
            "failed_at": now_rfc3339(),
            "infl8_version": env!("CARGO_PKG_VERSION"),
        });
        let error_report = match fsio::write_atomic(
            &report,
            serde_json::to_string_pretty(&body)?.as_bytes(),
        ) {
            Ok(()) => format!("failed/{report_name}"),
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => {
                error!(input = %key.name, "cannot write its error report, recording the failure without it: {e}");
                String::new()
            }
        };
        self.point("error-report")?;
        let r = Record::Failed {
            name: key.name.clone(),
            sha256: key.sha256.clone(),
            reason: reason.to_string(),
            error_report,
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

    /// Moves a finished input out of the inbox (when `move_inputs`), to
    /// `done/` or `failed/` under its slot's name. Idempotent: a restart
    /// repeats it safely.
    fn finish_move(&mut self, key: &Key, slot: &str, done: bool) -> Result<()> {
        if !self.o.watch.move_inputs {
            return Ok(());
        }
        let src = self.o.inbox.join(&key.name);
        if !src.is_file() {
            return Ok(());
        }
        let dir = self.o.outbox.join(if done { "done" } else { "failed" });
        let dest = dir.join(safe_name(slot, extension_of(&key.name)));
        if let Err(e) = fs::rename(&src, &dest) {
            if e.raw_os_error() != Some(libc::EXDEV) {
                return Err(e).with_context(|| {
                    format!("cannot move {} to {}", src.display(), dest.display())
                });
            }
            // Another filesystem: copy (atomically), then remove.
            let mut from =
                fs::File::open(&src).with_context(|| format!("cannot open {}", src.display()))?;
            fsio::write_with(&dest, |to| {
                std::io::copy(&mut from, to)
                    .map(drop)
                    .map_err(|error| fsio::WriteError::Io {
                        path: dest.clone(),
                        action: "copy the input to",
                        error,
                    })
            })?;
            fs::remove_file(&src).with_context(|| format!("cannot remove {}", src.display()))?;
        }
        sync_dir(&dir)?;
        sync_dir(&self.o.inbox)?;
        self.point("moved")
    }
}

/// How `process` left an input.
enum Processed {
    /// Recorded (or left for the next start when stopping).
    Finished,
    /// Its results could not be written for now: tried again later.
    Deferred,
    /// It changed while it was processed (a slow writer was still at it):
    /// judged by stability again, then processed as the new file it is.
    Changed,
}

/// Another service's claim is usually over within a volume.
const CLAIMED_RETRY: Duration = Duration::from_secs(2);

/// The pause before the `n`th retry after a transient error: 1 s, doubling,
/// at most a minute.
/// `c` is no longer the size or mtime it had when it was taken (or gone).
fn changed_since(c: &Candidate) -> bool {
    fs::metadata(&c.path).map_or(true, |m| m.len() != c.size || mtime_ns(&m) != c.mtime_ns)
}

fn backoff(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.min(6)).min(Duration::from_secs(60))
}

/// Longest slot stem: its longest result name (`<slot>-<12 hex>-<n>` and
/// `.nii.gz.error.json`) must fit `NAME_MAX`.
const SLOT_STEM_MAX: usize = 200;

/// `<base><suffix>`, the base shortened as needed to fit `NAME_MAX` (slots
/// from journals written before slots were bounded can be longer).
fn safe_name(base: &str, suffix: &str) -> String {
    format!(
        "{}{suffix}",
        fsio::fit_name(base, fsio::NAME_MAX - suffix.len())
    )
}

/// The identity of an input refused from its size alone: not hashed.
fn unhashed_key(size: u64, mtime_ns: u64) -> String {
    format!("unhashed-{size}-{mtime_ns}")
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

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
