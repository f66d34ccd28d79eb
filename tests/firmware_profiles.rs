//! `infl8 config check` on the shipped firmware profiles (every `*.toml` in
//! `firmware-configs/`, so a new profile is checked without editing this
//! file) and on broken settings files, whose errors must name the file and
//! the key's whole path. `backend_options` are judged by the plugins the
//! binary finds (tract and ort beside it, the C reference plugin where a
//! profile points to it), through their `options_check`.

use std::path::{Path, PathBuf};

use infl8_suite::{c_reference_plugin, infl8, ok, repo_root, s};

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

/// The value of `key` in `[table]` (`None`: the top level) of a settings
/// file, as written: enough TOML for the profiles' one-line values.
fn value(text: &str, table: Option<&str>, key: &str) -> Option<String> {
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(name.trim().to_owned());
        } else if let Some((k, v)) = line.split_once('=')
            && k.trim() == key
            && current.as_deref() == table
        {
            return Some(v.trim().to_owned());
        }
    }
    None
}

/// The summary `infl8 config check` must print for the profile `text`:
/// the file's own values (every shipped profile states them).
fn expected_summary(file: &Path, text: &str) -> String {
    let get = |table, key| {
        value(text, table, key)
            .unwrap_or_else(|| panic!("{}: no {key} (profiles state it)", file.display()))
    };
    let backends: Vec<String> = get(None, "backends")
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|b| b.trim().trim_matches('"').to_owned())
        .filter(|b| !b.is_empty())
        .collect();
    let threads = match get(None, "threads").as_str() {
        "0" => "0 (one per core)".to_owned(),
        n => n.to_owned(),
    };
    let budget = match get(Some("limits"), "memory_budget_mb").as_str() {
        "0" => "none".to_owned(),
        mb => format!("{mb} MiB"),
    };
    format!(
        "ok {}: backends {}, precision {}, threads {threads}, window batch {}, memory budget {budget}",
        file.display(),
        backends.join(" -> "),
        get(None, "precision").trim_matches('"'),
        get(None, "window_batch"),
    )
}

#[test]
fn every_shipped_profile_passes() {
    let files = profiles();
    assert!(files.len() >= 5, "profiles: {files:?}");
    for f in &files {
        let out = ok(&infl8(&["config", "check", s(f)]));
        // The report states what the file says, not just that it parsed.
        let text = std::fs::read_to_string(f).unwrap();
        let first = out.lines().next().unwrap_or_default();
        assert_eq!(first, expected_summary(f, &text), "{}", f.display());
        // Anything after the summary is a note.
        for line in out.lines().skip(1) {
            assert!(line.starts_with("  note: "), "{}: {line}", f.display());
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
        nano.contains("backends ort-tensorrt -> ort-cuda -> tract-cuda -> tract, precision fp16"),
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

/// Runs `infl8 config check` on `text`, which must pass; its report.
fn passing(dir: &Path, name: &str, text: &str) -> String {
    let f = dir.join(name);
    std::fs::write(&f, text).expect("write the settings file");
    ok(&infl8(&["config", "check", s(&f)]))
}

#[test]
fn plugins_judge_their_options_and_errors_name_the_key_path() {
    let dir = tempfile::tempdir().unwrap();
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
        let all = failure(dir.path(), "p.toml", text);
        assert!(all.contains(want), "{text:?}: wanted `{want}` in:\n{all}");
    }
}

#[test]
fn what_a_backend_cannot_honour_is_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let out = passing(
        dir.path(),
        "p.toml",
        "backends = [\"ort-tensorrt\", \"ort-cuda\", \"tract\"]\nprecision = \"fp16\"\n\
         threads = 6\nwindow_batch = 2\n[limits]\nmemory_budget_mb = 512\n\
         [backend_options.ort-tensorrt]\ntrt_engine_cache_dir = \"/var/cache/trt\"\n",
    );
    assert!(
        out.contains(
            "backends ort-tensorrt -> ort-cuda -> tract, precision fp16, threads 6, \
             window batch 2, memory budget 512 MiB"
        ),
        "{out}"
    );
    // The fallbacks cannot honour fp16, which is worth knowing; ort-cpu is
    // not in the chain, so nothing is said about it.
    assert!(
        out.contains("note: precision: fp16 has no switch on ort-cuda"),
        "{out}"
    );
    assert!(
        out.contains("note: precision: fp16 has no switch in tract"),
        "{out}"
    );
    assert!(!out.contains("ort-cpu"), "{out}");

    let out = passing(
        dir.path(),
        "q.toml",
        "[backend_options.ort-cpu]\ntrt_fp16 = true\n",
    );
    assert!(
        out.contains("note: backend_options.ort-cpu.trt_fp16: ort-cpu does not read it"),
        "{out}"
    );
    // An explicit trt key wins over the precision and passes.
    passing(
        dir.path(),
        "r.toml",
        "backend = \"ort-tensorrt\"\nprecision = \"fp16\"\n\
         [backend_options.ort-tensorrt]\ntrt_fp16 = false\n",
    );
}

#[test]
fn tables_no_plugin_checks_pass_with_a_note_that_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let out = passing(
        dir.path(),
        "acme.toml",
        "backend = \"acme-npu\"\n[backend_options.acme]\nanything = 1\n",
    );
    assert!(
        out.contains("note: backend_options.acme: not checked: no plugin found here provides"),
        "{out}"
    );
    // The C reference plugin has no options_check: found, but not asked.
    let cref = c_reference_plugin();
    let out = passing(
        dir.path(),
        "cref.toml",
        &format!(
            "backend = \"c-reference\"\nplugin_dirs = [{:?}]\n\
             [backend_options.c-reference]\nanything = 1\n",
            s(cref.parent().unwrap())
        ),
    );
    assert!(
        out.contains("note: backend c-reference: options not checked")
            && out.contains("offers no options_check (ABI 1.2)"),
        "{out}"
    );
}

/// A vendor's plugin judges its own table through the ABI: the SDK's Rust
/// example, found beside the binary like any plugin.
#[test]
fn a_vendor_plugin_checks_its_own_options() {
    let dir = tempfile::tempdir().unwrap();
    let all = failure(
        dir.path(),
        "vendor.toml",
        "backend = \"example-rust\"\n[backend_options.example-rust]\nbogus = 1\n",
    );
    assert!(
        all.contains("backend_options.example-rust.bogus: the example plugin reads no options"),
        "{all}"
    );
    let out = passing(
        dir.path(),
        "vendor-ok.toml",
        "backend = \"example-rust\"\nprecision = \"fp16\"\n",
    );
    assert!(
        out.contains("note: precision: fp16 is not honoured; the example runs fp32"),
        "{out}"
    );
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
    // The good file's report is the one it gets alone, and the only one.
    let alone = ok(&infl8(&["config", "check", s(&good)]));
    assert_eq!(stdout, alone, "{stderr}");
    let text = std::fs::read_to_string(&good).unwrap();
    assert_eq!(
        stdout.lines().next(),
        Some(expected_summary(&good, &text).as_str())
    );
    // One error per bad file, each naming its file, then the count.
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 2, "{stderr}");
    assert!(
        errors[0].contains(s(&bad)) && errors[0].contains("watch.poll: unknown key"),
        "{stderr}"
    );
    assert!(errors[1].contains(s(&missing)), "{stderr}");
    assert!(stderr.contains("2 of 3 settings files failed"), "{stderr}");
}
