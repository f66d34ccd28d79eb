//! `infl8 config check`: validate settings files (firmware profiles).
//!
//! A file passes when infl8-core's loader accepts it on its own (no
//! environment, no flags) — unknown keys and bad values are errors naming
//! the key's whole path — and when every `backend_options` table holds only
//! options its plugin reads, with valid values. The plugins judge that
//! themselves, through `options_check` (plugin ABI 1.2): the check loads the
//! plugins the file's `plugin_dirs` (and the binary's folder) hold, as a
//! run would, and asks each backend named by a table or by the chain.
//! A table no plugin found here provides, or whose plugin predates 1.2, is
//! not checked, with a note saying so.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use infl8_backend::BackendError;
use infl8_core::config::{self, ConfigError, Settings};
use infl8_core::engine;
use infl8_core::plugin::PluginHost;

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Validate a settings file: unknown keys and bad values are errors naming the key.
    Check(CheckArgs),
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Settings files to check.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

pub fn run(c: ConfigCommand) -> Result<ExitCode> {
    match c {
        ConfigCommand::Check(a) => {
            let mut failed = 0;
            for file in &a.files {
                match check(file) {
                    Ok(report) => {
                        println!("ok {}: {}", file.display(), report.summary);
                        for note in &report.notes {
                            println!("  note: {note}");
                        }
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!("error: {e}");
                    }
                }
            }
            if failed == 0 {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("{failed} of {} settings files failed", a.files.len());
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

/// What a valid file holds, in one line, and what is worth knowing about it.
#[derive(Debug)]
struct Report {
    summary: String,
    notes: Vec<String>,
}

fn check(file: &Path) -> Result<Report, ConfigError> {
    let s = config::check_file(file)?;
    let invalid = |message: String| ConfigError::Invalid {
        file: Some(file.to_path_buf()),
        message,
    };
    let mut host = engine::new_host(&s);
    let mut notes = Vec::new();
    for (library, result) in host.discover() {
        if let Err(e) = result {
            notes.push(format!("plugin {}: not loaded: {e}", library.display()));
        }
    }
    check_backend_options(&s, &host, &mut notes).map_err(invalid)?;
    Ok(Report {
        summary: summary(&s),
        notes,
    })
}

/// Asks every backend a table or the chain names to check the options a
/// run would give it.
fn check_backend_options(
    s: &Settings,
    host: &PluginHost,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    let names: Vec<String> = host.backends().into_iter().map(|b| b.name).collect();
    for table in s.backend_options.keys() {
        if !names.iter().any(|n| in_table(n, table)) {
            notes.push(format!(
                "backend_options.{table}: not checked: no plugin found here provides a backend \
                 `{table}` (its plugin checks it when it loads a model; searched {})",
                list_dirs(host)
            ));
        }
    }
    let chain = s.backend_chain();
    for name in &names {
        let has_table = s.backend_options.keys().any(|t| in_table(name, t));
        let in_chain = chain.iter().any(|b| b == name);
        if !has_table && !in_chain {
            continue;
        }
        let backend = host.backend(name).map_err(|e| e.to_string())?;
        match backend.check_options(&s.load_options(name)) {
            Ok(found) => {
                for note in found {
                    let (key, why) = split_key(&note);
                    // Off the chain, only what the backend's own table says
                    // matters: a family table speaks to all its backends.
                    let own = s
                        .backend_options
                        .get(name.as_str())
                        .is_some_and(|t| t.contains_key(key));
                    if in_chain || own {
                        notes.push(format!("{}: {why}", key_path(s, name, key)));
                    }
                }
            }
            Err(BackendError::InvalidArgument(message)) => {
                let (key, why) = split_key(&message);
                return Err(format!("{}: {why}", key_path(s, name, key)));
            }
            Err(BackendError::Unsupported(message)) => {
                if has_table {
                    notes.push(format!("backend {name}: options not checked: {message}"));
                }
            }
            Err(e) => return Err(format!("backend {name}: checking its options failed: {e}")),
        }
    }
    Ok(())
}

/// A plugin's message `key: text` (the `options_check` contract) as its
/// key and text; a message without a key is all text.
fn split_key(message: &str) -> (&str, &str) {
    match message.split_once(": ") {
        Some((key, why)) if !key.is_empty() && !key.contains(' ') => (key, why),
        _ => ("", message),
    }
}

fn list_dirs(host: &PluginHost) -> String {
    let dirs: Vec<String> = host
        .search_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    dirs.join(", ")
}

fn summary(s: &Settings) -> String {
    let threads = match s.threads {
        0 => "0 (one per core)".to_owned(),
        n => n.to_string(),
    };
    let budget = match s.limits.memory_budget_mb {
        0 => "none".to_owned(),
        mb => format!("{mb} MiB"),
    };
    format!(
        "backends {}, precision {}, threads {threads}, window batch {}, memory budget {budget}",
        s.backend_chain().join(" -> "),
        s.precision.as_str(),
        s.window_batch
    )
}

/// `table` reaches `backend`: its own table, or its family's (`ort` for
/// `ort-cpu`).
fn in_table(backend: &str, table: &str) -> bool {
    config::option_tables(backend).any(|t| t == table)
}

/// The settings key that gave `key` to `backend`: its own table, else its
/// family's, else the top-level setting (see `Settings::load_options`).
fn key_path(s: &Settings, backend: &str, key: &str) -> String {
    if key.is_empty() {
        return format!("backend {backend}");
    }
    for table in config::option_tables(backend).rev() {
        if s.backend_options
            .get(table)
            .is_some_and(|t| t.contains_key(key))
        {
            return format!("backend_options.{table}.{key}");
        }
    }
    key.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    // The checks that need the plugins run the real binary with its built
    // plugins: tests/firmware_profiles.rs.

    #[test]
    fn messages_split_at_their_key() {
        assert_eq!(
            split_key("trt_fp16: expected true or false"),
            ("trt_fp16", "expected true or false")
        );
        assert_eq!(split_key("no key here"), ("", "no key here"));
        assert_eq!(split_key("two words: text"), ("", "two words: text"));
    }

    #[test]
    fn tables_reach_their_family() {
        assert!(in_table("ort-cpu", "ort"));
        assert!(in_table("ort-cpu", "ort-cpu"));
        assert!(!in_table("ort-cpu", "ort-cuda"));
        assert!(!in_table("tractor", "tract"));
        assert!(in_table("tract", "tract"));
    }
}
