//! `infl8 config check` on the shipped firmware profiles (every `*.toml` in
//! `firmware-configs/`, so a new profile is checked without editing this
//! file) and on broken settings files, whose errors must name the file and
//! the key's whole path.

use std::path::{Path, PathBuf};

use infl8_suite::{infl8, ok, repo_root, s};

fn profiles() -> Vec<PathBuf> {
    let dir = repo_root().join("firmware-configs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("readable folder entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_profile_passes() {
    let files = profiles();
    assert!(files.len() >= 5, "profiles: {files:?}");
    for f in &files {
        let out = ok(&infl8(&["config", "check", s(f)]));
        let line = format!("ok {}: backends ", f.display());
        assert!(out.starts_with(&line), "{}: {out}", f.display());
        for part in ["precision ", "threads ", "window batch ", "memory budget "] {
            assert!(out.contains(part), "{}: {out}", f.display());
        }
    }
    // All at once: one line each.
    let args: Vec<&str> = ["config", "check"]
        .into_iter()
        .chain(files.iter().map(|f| s(f)))
        .collect();
    let out = ok(&infl8(&args));
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok ")).count(),
        files.len(),
        "{out}"
    );
}

#[test]
fn the_profiles_say_what_the_devices_need() {
    let dir = repo_root().join("firmware-configs");
    let check = |name: &str| ok(&infl8(&["config", "check", s(&dir.join(name))]));
    let nano = check("jetson-orin-nano.toml");
    assert!(
        nano.contains("backends ort-tensorrt -> ort-cuda -> tract, precision fp16"),
        "{nano}"
    );
    let pi = check("arm64-cpu.toml");
    assert!(
        pi.contains("backends tract, precision fp32, threads 4"),
        "{pi}"
    );
    let cuda = check("x86_64-cuda.toml");
    assert!(cuda.contains("precision fp16"), "{cuda}");
}

/// Runs `infl8 config check` on `text` and returns the output of the failure.
fn failure(dir: &Path, name: &str, text: &str) -> String {
    let f = dir.join(name);
    std::fs::write(&f, text).expect("write the settings file");
    let out = infl8(&["config", "check", s(&f)]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{name} passed:\n{all}");
    assert!(
        all.contains(s(&f)),
        "{name}: the message names the file:\n{all}"
    );
    all
}

#[test]
fn broken_files_fail_naming_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text, key) in [
        (
            "unknown.toml",
            "bakend = \"tract\"\n",
            "bakend: unknown key",
        ),
        (
            "nested-unknown.toml",
            "[limits]\nmax_voxel = 1\n",
            "limits.max_voxel: unknown key",
        ),
        (
            "bad-value.toml",
            "[limits]\nmax_voxels = \"lots\"\n",
            "limits.max_voxels: invalid type",
        ),
        (
            "out-of-range.toml",
            "[model]\noverlap = 1.5\n",
            "model.overlap",
        ),
        (
            "bad-precision.toml",
            "precision = \"fp8\"\n",
            "precision: `fp8` is not a precision",
        ),
        (
            "bad-trt-option.toml",
            "[backend_options.ort-tensorrt]\ntrt_fp16 = \"maybe\"\n",
            "backend_options.ort-tensorrt.trt_fp16",
        ),
        (
            "unknown-ort-option.toml",
            "[backend_options.ort]\ntrt_fp61 = true\n",
            "backend_options.ort.trt_fp61",
        ),
        ("not-toml.toml", "threads = \n", "TOML parse error"),
    ] {
        let all = failure(dir.path(), name, text);
        assert!(all.contains(key), "{name}: wanted `{key}` in:\n{all}");
    }
}

#[test]
fn one_bad_file_fails_the_run_and_the_others_are_still_checked() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[watch]\npoll = 1\n").unwrap();
    let good = repo_root().join("firmware-configs/x86_64-cpu.toml");
    let missing = dir.path().join("missing.toml");
    let out = infl8(&["config", "check", s(&bad), s(&good), s(&missing)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("ok {}", good.display())),
        "{stdout}"
    );
    assert!(stderr.contains("watch.poll: unknown key"), "{stderr}");
    assert!(stderr.contains(s(&missing)), "{stderr}");
    assert!(stderr.contains("2 of 3"), "{stderr}");
}
