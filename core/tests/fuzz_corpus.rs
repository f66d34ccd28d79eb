//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) and the
//! inputs of fixed fuzzer findings (`core/tests/fuzz-regressions/<target>/`)
//! through the functions the fuzz targets call, on stable and without a
//! fuzzer: a panic in any of them fails the test. Results may be Ok or Err.
//! See docs/fuzzing.md.

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use infl8_core::fuzzing;

/// A fuzz target's entry point.
type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 4] = [
    ("nifti_read", fuzzing::nifti_read),
    ("manifest_parse", fuzzing::manifest_parse),
    ("config_parse", fuzzing::config_parse),
    ("tensor_check", fuzzing::tensor_check),
];

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return vec![];
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every file under `root/<target>/`; returns how many ran and the
/// files that panicked, with the panic message.
fn replay(root: &Path) -> (usize, Vec<String>) {
    let mut ran = 0;
    let mut failed = Vec::new();
    for (target, run) in TARGETS {
        for file in inputs(&root.join(target)) {
            let bytes = fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            // Caught only to report every failing file at once; the runtime
            // itself never relies on catching these.
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| run(&bytes))) {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failed.push(format!("{target}: {}: {msg}", file.display()));
            }
            ran += 1;
        }
    }
    (ran, failed)
}

#[test]
fn committed_corpus_runs_without_panics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let (ran, failed) = replay(&root);
    assert!(failed.is_empty(), "panics:\n{}", failed.join("\n"));
    for (target, _) in TARGETS {
        assert!(
            !inputs(&root.join(target)).is_empty(),
            "no corpus for {target} under {}",
            root.display()
        );
    }
    assert!(ran >= TARGETS.len());
}

#[test]
fn fixed_fuzzer_findings_stay_fixed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    let (_, failed) = replay(&root);
    assert!(failed.is_empty(), "panics:\n{}", failed.join("\n"));
}

#[test]
fn empty_and_tiny_inputs_are_harmless() {
    for (_, run) in TARGETS {
        for bytes in [&b""[..], b"\0", b"\x1f\x8b", b"{}", &[0xff; 64]] {
            run(bytes);
        }
    }
}
