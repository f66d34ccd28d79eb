//! The `infl8 watch` journal: an append-only file of JSON lines, each
//! fsynced before the step it records is taken further, replayed on start.
//!
//! An input is identified by its file name *and* the sha256 of its bytes, so
//! a new file arriving under an old name is a new input.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug)]
pub(crate) enum JournalError {
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    Corrupt {
        path: PathBuf,
        line: usize,
        detail: String,
    },
}

impl std::error::Error for JournalError {}

impl std::fmt::Display for JournalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JournalError::Io { path, source } => write!(f, "journal {}: {source}", path.display()),
            JournalError::Corrupt { path, line, detail } => write!(
                f,
                "journal {} is corrupt at line {line} ({detail}); only its last line can be \
                 torn by a crash, so this file was changed by something else",
                path.display()
            ),
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One journal line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(crate) enum Record {
    /// Processing of the input starts (attempt `attempt`, counting from 1);
    /// its results will be named after `slot`.
    Taken {
        name: String,
        sha256: String,
        size: u64,
        mtime_ns: u64,
        attempt: u32,
        slot: String,
        at: String,
    },
    /// The output and report exist, complete.
    Done {
        name: String,
        sha256: String,
        output: String,
        report: String,
        latency_s: f64,
        at: String,
    },
    /// The results could not be written for a passing reason (a full or
    /// read-only outbox): the input stays, and this attempt does not count
    /// towards `watch.max_attempts`.
    Deferred {
        name: String,
        sha256: String,
        reason: String,
        at: String,
    },
    /// The input is poison; its error report exists (unless
    /// `error_report` is empty: it could not be written).
    Failed {
        name: String,
        sha256: String,
        reason: String,
        error_report: String,
        at: String,
    },
    /// The file under this name changed before this content had results
    /// (a slow writer was still at it when it was taken): this content is
    /// forgotten, with its slot, and the new one is a new input. Nothing
    /// is moved.
    Superseded {
        name: String,
        sha256: String,
        reason: String,
        at: String,
    },
}

impl Record {
    fn key(&self) -> Key {
        let (Record::Taken { name, sha256, .. }
        | Record::Done { name, sha256, .. }
        | Record::Deferred { name, sha256, .. }
        | Record::Failed { name, sha256, .. }
        | Record::Superseded { name, sha256, .. }) = self;
        Key {
            name: name.clone(),
            sha256: sha256.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub name: String,
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Outcome {
    Done { output: String, latency_s: f64 },
    Failed { reason: String },
}

/// What the journal says about one input.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Item {
    pub key: Key,
    pub size: u64,
    pub mtime_ns: u64,
    /// `taken` records so far.
    pub attempts: u32,
    /// `deferred` records so far: attempts that were not the input's fault.
    pub deferred: u32,
    pub slot: String,
    pub outcome: Option<Outcome>,
}

/// The journal replayed: every input it knows, by identity.
#[derive(Debug, Default)]
pub(crate) struct State {
    items: HashMap<Key, Item>,
    slots: HashSet<String>,
    /// Keys in the order they were first taken.
    order: Vec<Key>,
}

impl State {
    pub(crate) fn replay<'a>(records: impl IntoIterator<Item = &'a Record>) -> State {
        let mut s = State::default();
        for r in records {
            s.apply(r);
        }
        s
    }

    pub(crate) fn apply(&mut self, r: &Record) {
        let key = r.key();
        match r {
            Record::Taken {
                size,
                mtime_ns,
                attempt,
                slot,
                ..
            } => {
                self.slots.insert(slot.clone());
                match self.items.get_mut(&key) {
                    Some(item) => {
                        item.attempts = item.attempts.max(*attempt);
                        item.size = *size;
                        item.mtime_ns = *mtime_ns;
                        // Taken again after an outcome: a failed input tried
                        // again (--retry-failed).
                        item.outcome = None;
                    }
                    None => {
                        self.order.push(key.clone());
                        self.items.insert(
                            key.clone(),
                            Item {
                                key,
                                size: *size,
                                mtime_ns: *mtime_ns,
                                attempts: *attempt,
                                deferred: 0,
                                slot: slot.clone(),
                                outcome: None,
                            },
                        );
                    }
                }
            }
            Record::Done {
                output, latency_s, ..
            } => {
                if let Some(item) = self.items.get_mut(&key) {
                    item.outcome = Some(Outcome::Done {
                        output: output.clone(),
                        latency_s: *latency_s,
                    });
                }
            }
            Record::Deferred { .. } => {
                if let Some(item) = self.items.get_mut(&key) {
                    item.deferred += 1;
                }
            }
            Record::Failed { reason, .. } => {
                if let Some(item) = self.items.get_mut(&key) {
                    item.outcome = Some(Outcome::Failed {
                        reason: reason.clone(),
                    });
                }
            }
            Record::Superseded { .. } => {
                if let Some(item) = self.items.remove(&key) {
                    self.slots.remove(&item.slot);
                    self.order.retain(|k| *k != key);
                }
            }
        }
    }

    pub(crate) fn get(&self, key: &Key) -> Option<&Item> {
        self.items.get(key)
    }

    /// Inputs taken but never finished: the service died while on them.
    pub(crate) fn interrupted(&self) -> Vec<&Item> {
        self.order
            .iter()
            .filter_map(|k| self.items.get(k))
            .filter(|i| i.outcome.is_none())
            .collect()
    }

    /// A finished input that a file in the inbox still is, judged by name,
    /// size and mtime (so an inbox left in place is not re-hashed each scan).
    pub(crate) fn finished_as(&self, name: &str, size: u64, mtime_ns: u64) -> Option<&Item> {
        self.items.values().find(|i| {
            i.outcome.is_some() && i.key.name == name && i.size == size && i.mtime_ns == mtime_ns
        })
    }

    /// The slot (base name of the results) for a new input: its stem, or the
    /// stem and a piece of its checksum when another input already has it or
    /// `taken_on_disk` says the name is in use.
    pub(crate) fn new_slot(
        &self,
        stem: &str,
        sha256: &str,
        taken_on_disk: impl Fn(&str) -> bool,
    ) -> String {
        if !self.slots.contains(stem) && !taken_on_disk(stem) {
            return stem.to_string();
        }
        let short = &sha256[..sha256.len().min(12)];
        let mut slot = format!("{stem}-{short}");
        let mut n = 1;
        while self.slots.contains(&slot) {
            n += 1;
            slot = format!("{stem}-{short}-{n}");
        }
        slot
    }

    /// (done, failed) counts.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let mut c = (0, 0);
        for i in self.items.values() {
            match i.outcome {
                Some(Outcome::Done { .. }) => c.0 += 1,
                Some(Outcome::Failed { .. }) => c.1 += 1,
                None => {}
            }
        }
        c
    }
}

/// The open journal file.
pub(crate) struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Opens (creating) `path` and returns its records. A last line without
    /// its newline, or one that does not parse, is a write torn by a crash:
    /// it is cut off, since its step was never acted on.
    pub(crate) fn open(path: &Path) -> Result<(Journal, Vec<Record>), JournalError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io(path))?;
        if !existed {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
        }
        let mut records = Vec::new();
        let mut good_len = 0u64;
        let mut torn: Option<(usize, String)> = None;
        let mut reader = BufReader::new(&file);
        // Bytes, not a String: a write torn inside a multi-byte character
        // (a non-ASCII file name) is not UTF-8, and must read as a torn line
        // rather than make the journal unreadable.
        let mut line = Vec::new();
        let mut n = 0;
        loop {
            line.clear();
            let read = reader.read_until(b'\n', &mut line).map_err(io(path))?;
            if read == 0 {
                break;
            }
            n += 1;
            if let Some((at, detail)) = torn.take() {
                // A bad line followed by more lines is not a torn tail.
                return Err(JournalError::Corrupt {
                    path: path.to_path_buf(),
                    line: at,
                    detail,
                });
            }
            let complete = line.ends_with(b"\n");
            match serde_json::from_slice::<Record>(line.trim_ascii_end()) {
                Ok(r) if complete => {
                    records.push(r);
                    good_len += read as u64;
                }
                Ok(_) => torn = Some((n, "no newline".into())),
                Err(e) => torn = Some((n, e.to_string())),
            }
        }
        drop(reader);
        if let Some((at, detail)) = torn {
            tracing::warn!(
                journal = %path.display(),
                line = at,
                "dropping a torn last journal line ({detail})"
            );
            file.set_len(good_len).map_err(io(path))?;
            file.sync_all().map_err(io(path))?;
        }
        file.seek(SeekFrom::End(0)).map_err(io(path))?;
        Ok((
            Journal {
                path: path.to_path_buf(),
                file,
            },
            records,
        ))
    }

    /// Appends one record and fsyncs it: when this returns, the record
    /// survives a crash or power loss.
    pub(crate) fn append(&mut self, r: &Record) -> Result<(), JournalError> {
        let mut line = serde_json::to_string(r).map_err(|e| JournalError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push('\n');
        let len = self.file.metadata().map_err(io(&self.path))?.len();
        let r = self
            .file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data());
        if r.is_err() {
            // A full disk can take part of the line: cut it, or the next
            // record would follow a torn line and make the journal corrupt.
            let _ = self.file.set_len(len);
        }
        r.map_err(io(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(name: &str, sha: &str, attempt: u32) -> Record {
        Record::Taken {
            name: name.into(),
            sha256: sha.into(),
            size: 10,
            mtime_ns: 5,
            attempt,
            slot: name.trim_end_matches(".nii.gz").into(),
            at: String::new(),
        }
    }

    fn done(name: &str, sha: &str) -> Record {
        Record::Done {
            name: name.into(),
            sha256: sha.into(),
            output: "o".into(),
            report: "r".into(),
            latency_s: 1.0,
            at: String::new(),
        }
    }

    #[test]
    fn replay_tracks_attempts_outcomes_and_identity() {
        let failed = Record::Failed {
            name: "b.nii.gz".into(),
            sha256: "bb".into(),
            reason: "corrupt".into(),
            error_report: "e".into(),
            at: String::new(),
        };
        let s = State::replay(&[
            taken("a.nii.gz", "aa", 1),
            taken("b.nii.gz", "bb", 1),
            taken("a.nii.gz", "aa", 2),
            done("a.nii.gz", "aa"),
            failed,
            // Same name, new content: a new input, interrupted.
            taken("a.nii.gz", "a2", 1),
        ]);
        let a = s
            .get(&Key {
                name: "a.nii.gz".into(),
                sha256: "aa".into(),
            })
            .unwrap();
        assert_eq!(a.attempts, 2);
        assert!(matches!(a.outcome, Some(Outcome::Done { .. })));
        assert_eq!(s.counts(), (1, 1));
        let open: Vec<_> = s
            .interrupted()
            .iter()
            .map(|i| i.key.sha256.clone())
            .collect();
        assert_eq!(open, ["a2"]);
        assert!(s.finished_as("a.nii.gz", 10, 5).is_some());
        assert!(s.finished_as("a.nii.gz", 11, 5).is_none());
        // The stem is taken: the new input's results get the checksum too.
        assert_eq!(
            s.new_slot("a", "a2ffffffffffffff", |_| false),
            "a-a2ffffffffff"
        );
        assert_eq!(s.new_slot("c", "cc", |_| false), "c");
        assert_eq!(s.new_slot("c", "cc", |n| n == "c"), "c-cc");
    }

    #[test]
    fn a_torn_last_line_is_cut_and_appends_continue_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal.jsonl");
        {
            let (mut j, recs) = Journal::open(&p).unwrap();
            assert!(recs.is_empty());
            j.append(&taken("a.nii.gz", "aa", 1)).unwrap();
            j.append(&done("a.nii.gz", "aa")).unwrap();
        }
        // A crash in the middle of the third append.
        let full = std::fs::read_to_string(&p).unwrap();
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(br#"{"event":"taken","name":"b.nii"#).unwrap();
        drop(f);
        let (mut j, recs) = Journal::open(&p).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), full);
        j.append(&taken("b.nii.gz", "bb", 1)).unwrap();
        drop(j);
        let (_, recs) = Journal::open(&p).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[2], taken("b.nii.gz", "bb", 1));

        // A complete record without its newline is also torn (the newline
        // is part of the write that fsync confirmed).
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(
            serde_json::to_string(&done("b.nii.gz", "bb"))
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
        drop(f);
        let (_, recs) = Journal::open(&p).unwrap();
        assert_eq!(recs.len(), 3, "the unterminated done record is dropped");
    }

    #[test]
    fn a_write_torn_inside_a_multibyte_character_is_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal.jsonl");
        {
            let (mut j, _) = Journal::open(&p).unwrap();
            j.append(&taken("Müller.nii.gz", "aa", 1)).unwrap();
        }
        let full = std::fs::read(&p).unwrap();
        // The next record, cut after the first byte of `ü` (0xC3 0xBC).
        let next = serde_json::to_vec(&done("Müller.nii.gz", "aa")).unwrap();
        let cut = next.iter().position(|&b| b == 0xC3).unwrap() + 1;
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&next[..cut]).unwrap();
        drop(f);
        let (_, recs) = Journal::open(&p).unwrap();
        assert_eq!(recs, [taken("Müller.nii.gz", "aa", 1)]);
        assert_eq!(std::fs::read(&p).unwrap(), full, "the torn tail is cut");
    }

    #[test]
    fn a_bad_line_in_the_middle_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal.jsonl");
        let good = serde_json::to_string(&taken("a.nii.gz", "aa", 1)).unwrap();
        std::fs::write(&p, format!("{good}\nnot json\n{good}\n")).unwrap();
        let e = Journal::open(&p).err().unwrap().to_string();
        assert!(e.contains("line 2") && e.contains("journal.jsonl"), "{e}");
    }
}
