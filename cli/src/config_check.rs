//! `infl8 config check`: validate settings files (firmware profiles).
//!
//! A file passes when infl8-core's loader accepts it on its own (no
//! environment, no flags) — unknown keys and bad values are errors naming
//! the key's whole path — and when the `backend_options` tables of the
//! plugins this binary knows hold only options those plugins read, with
//! values of the right kind:
//!
//! - `ort`, `ort-cpu`, `ort-cuda`, `ort-tensorrt`: by the ort plugin's own
//!   option parser, compiled in from `plugins/ort/src/options.rs` (the CLI
//!   does not link the plugin, which would tie it to ONNX Runtime's crate);
//! - `tract`: the plugin reads only `precision`.
//!
//! Tables for other backends (a vendor's plugin) cannot be checked here;
//! their plugin checks them when it loads a model.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use infl8_backend::Precision;
use infl8_core::config::{self, ConfigError, Settings};

/// The ort plugin's option parser; it names the plugin's backends through
/// `super::Provider`, mirrored below. Parts of it only the plugin uses.
#[allow(dead_code)]
#[path = "../../plugins/ort/src/options.rs"]
mod ort_options;

/// The ort plugin's backends, as its `options.rs` sees them (the plugin's
/// `Provider` has the same variants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Provider {
    Cpu,
    Cuda,
    TensorRt,
}

impl Provider {
    const ALL: [Provider; 3] = [Provider::Cpu, Provider::Cuda, Provider::TensorRt];

    fn backend_name(self) -> &'static str {
        match self {
            Provider::Cpu => "ort-cpu",
            Provider::Cuda => "ort-cuda",
            Provider::TensorRt => "ort-tensorrt",
        }
    }
}

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
    let mut notes = Vec::new();
    check_ort(&s, &mut notes).map_err(invalid)?;
    check_tract(&s, &mut notes).map_err(invalid)?;
    for name in s.backend_options.keys() {
        if !is_family(name, "ort") && !is_family(name, "tract") {
            notes.push(format!(
                "backend_options.{name}: not checked here (its plugin checks it when it loads a \
                 model)"
            ));
        }
    }
    Ok(Report {
        summary: summary(&s),
        notes,
    })
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

/// `name` is the table of `family` (`ort`) or of one of its backends (`ort-cpu`).
fn is_family(name: &str, family: &str) -> bool {
    name == family || name.split_once('-').is_some_and(|(f, _)| f == family)
}

/// The settings key that gave `key` to `backend`: its own table, else its
/// family's, else the top-level `precision` (see `Settings::load_options`).
fn key_path(s: &Settings, backend: &str, key: &str) -> String {
    let family = backend.split_once('-').map(|(f, _)| f);
    for table in [Some(backend), family].into_iter().flatten() {
        if s.backend_options
            .get(table)
            .is_some_and(|t| t.contains_key(key))
        {
            return format!("backend_options.{table}.{key}");
        }
    }
    key.to_owned()
}

fn check_ort(s: &Settings, notes: &mut Vec<String>) -> Result<(), String> {
    if !s.backend_options.keys().any(|k| is_family(k, "ort"))
        && !s.backend_chain().iter().any(|b| is_family(b, "ort"))
    {
        return Ok(());
    }
    let names: Vec<_> = Provider::ALL.iter().map(|p| p.backend_name()).collect();
    for table in s.backend_options.keys() {
        if is_family(table, "ort") && table != "ort" && !names.contains(&table.as_str()) {
            notes.push(format!(
                "backend_options.{table}: the ort plugin has no backend `{table}` (it has {})",
                names.join(", ")
            ));
        }
    }
    let chain = s.backend_chain();
    // One family table reaches all three backends: report its keys once.
    let mut unknown = BTreeSet::new();
    for provider in Provider::ALL {
        let name = provider.backend_name();
        let extra = s.load_options(name).extra;
        let parsed = ort_options::OrtOptions::parse(&extra, provider)
            .map_err(|e| format!("{}: {}", key_path(s, name, &e.key), e.message))?;
        for key in &parsed.unknown {
            unknown.insert(key_path(s, name, key));
        }
        for key in &parsed.other_backend {
            // A family table speaks to every backend: only a backend's own
            // table holding what that backend ignores is worth a note.
            if s.backend_options
                .get(name)
                .is_some_and(|t| t.contains_key(key))
            {
                notes.push(format!(
                    "backend_options.{name}.{key}: {name} does not read it"
                ));
            }
        }
        if chain.iter().any(|b| b == name) {
            notes.extend(parsed.warnings);
        }
    }
    if let Some(first) = unknown.first() {
        return Err(format!(
            "{first}: not an option of the ort plugin (it reads {})",
            ort_options::ALL_KEYS.join(", ")
        ));
    }
    Ok(())
}

fn check_tract(s: &Settings, notes: &mut Vec<String>) -> Result<(), String> {
    for (table, options) in &s.backend_options {
        if !is_family(table, "tract") {
            continue;
        }
        if table != "tract" {
            notes.push(format!(
                "backend_options.{table}: the tract plugin has no backend `{table}` (it has tract)"
            ));
        }
        if let Some(key) = options.keys().find(|k| k.as_str() != "precision") {
            return Err(format!(
                "backend_options.{table}.{key}: not an option of the tract plugin (it reads \
                 precision)"
            ));
        }
    }
    if !s.backend_chain().iter().any(|b| b == "tract") {
        return Ok(());
    }
    let value = &s.load_options("tract").extra["precision"];
    let precision = value
        .as_str()
        .and_then(|v| v.parse::<Precision>().ok())
        .ok_or_else(|| {
            format!(
                "{}: expected fp32, fp16 or int8, got {value}",
                key_path(s, "tract", "precision")
            )
        })?;
    if precision != Precision::Fp32 {
        notes.push(format!(
            "tract: precision {} has no switch there; tract runs the model as stored",
            precision.as_str()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_text(text: &str) -> Result<Report, String> {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.toml");
        std::fs::write(&f, text).unwrap();
        check(&f).map_err(|e| e.to_string())
    }

    #[test]
    fn a_profile_in_one_line() {
        let r = check_text(
            "backends = [\"ort-tensorrt\", \"ort-cuda\", \"tract\"]\nprecision = \"fp16\"\n\
             threads = 6\nwindow_batch = 2\n[limits]\nmemory_budget_mb = 512\n\
             [backend_options.ort-tensorrt]\ntrt_engine_cache_dir = \"/var/cache/trt\"\n",
        )
        .unwrap();
        assert_eq!(
            r.summary,
            "backends ort-tensorrt -> ort-cuda -> tract, precision fp16, threads 6, \
             window batch 2, memory budget 512 MiB"
        );
        // The fallbacks cannot honour fp16, which is worth knowing.
        assert!(r.notes.iter().any(|n| n.starts_with("ort-cuda:")), "{r:?}");
        assert!(r.notes.iter().any(|n| n.starts_with("tract:")), "{r:?}");
        assert!(!r.notes.iter().any(|n| n.starts_with("ort-cpu:")), "{r:?}");
    }

    #[test]
    fn plugin_options_are_checked_with_their_path() {
        for (text, want) in [
            (
                "[backend_options.ort-tensorrt]\ntrt_fp16 = \"maybe\"\n",
                "backend_options.ort-tensorrt.trt_fp16: expected true or false",
            ),
            (
                "[backend_options.ort]\ntrt_workspace_size = -1\n",
                "backend_options.ort.trt_workspace_size: expected a non-negative integer",
            ),
            (
                "[backend_options.ort]\ntrt_fp61 = true\n",
                "backend_options.ort.trt_fp61: not an option of the ort plugin",
            ),
            (
                "[backend_options.ort-cuda]\nprecision = \"fp8\"\n",
                "backend_options.ort-cuda.precision: expected fp32, fp16 or int8",
            ),
            (
                "[backend_options.tract]\nprecision = \"half\"\n",
                "backend_options.tract.precision: expected fp32, fp16 or int8",
            ),
            (
                "[backend_options.tract]\nthreads = 2\n",
                "backend_options.tract.threads: not an option of the tract plugin",
            ),
        ] {
            let e = check_text(text).unwrap_err();
            assert!(e.contains(want) && e.contains("p.toml"), "{text:?}: {e}");
        }
    }

    #[test]
    fn other_plugins_tables_pass_with_a_note() {
        let r =
            check_text("backend = \"acme-npu\"\n[backend_options.acme]\nanything = 1\n").unwrap();
        assert!(
            r.notes
                .iter()
                .any(|n| n.contains("backend_options.acme: not checked")),
            "{r:?}"
        );
        let r = check_text("[backend_options.ort-cpu]\ntrt_fp16 = true\n").unwrap();
        assert!(
            r.notes
                .iter()
                .any(|n| n.contains("ort-cpu.trt_fp16: ort-cpu does not read it")),
            "{r:?}"
        );
    }

    #[test]
    fn explicit_trt_precision_wins_and_passes() {
        let r = check_text(
            "backend = \"ort-tensorrt\"\nprecision = \"fp16\"\n\
             [backend_options.ort-tensorrt]\ntrt_fp16 = false\n",
        );
        assert!(r.is_ok(), "{r:?}");
    }
}
