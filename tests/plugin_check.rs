//! `infl8 plugin check` (the conformance kit) on real plugin libraries: the
//! shipped tract and ort plugins pass (the ort GPU backends skipped as unable
//! to run on this CPU machine, or failed with `--require-all`); plugins that
//! panic, return errors, hand back inconsistent tensors, speak another ABI,
//! abort the process or hang fail the right checks, and the kit itself
//! survives every one of them.

use std::process::Output;

use infl8_suite::{infl8, infl8_ort, plugin_lib, s};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The table row for `check` of `backend` (`(library)` for library checks).
fn row<'a>(out: &'a str, backend: &str, check: &str) -> &'a str {
    out.lines()
        .find(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.get(1) == Some(&backend) && l.contains(check)
        })
        .unwrap_or_else(|| panic!("no row for {backend} / {check} in:\n{out}"))
}

/// The verdict column of that row.
fn verdict(out: &str, backend: &str, check: &str) -> String {
    let r = row(out, backend, check);
    r.split_whitespace().next().unwrap_or_default().to_owned()
}

fn json(o: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(o).expect("json report")).expect("valid json")
}

#[test]
fn tract_plugin_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.json");
    let lib = plugin_lib("infl8_tract");
    let o = infl8(&["plugin", "check", s(&lib), "--json", s(&report)]);
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("conforms"), "{out}");
    let r = json(&report);
    assert_eq!(r["failed"], 0);
    assert_eq!(r["conforms"], true);
    // 7 library checks + 11 for the one backend.
    assert_eq!(r["passed"], 18, "{out}");
    // tract's numbers are checked against the kit's own evaluator, not
    // against tract.
    let row = row(&out, "tract", "run batch N vs reference");
    assert!(
        row.starts_with("pass") && row.contains("max |diff| from the reference"),
        "{row}"
    );
}

/// On this CPU machine the whole ort library conforms: ort-cpu passes, the
/// GPU backends are skipped with the reason their load gives
/// (`INFL8_UNAVAILABLE`), and `--require-all` turns those skips into
/// failures.
#[test]
fn ort_library_conforms_with_gpu_backends_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.json");
    let lib = plugin_lib("infl8_ort");
    let o = infl8_ort(&["plugin", "check", s(&lib), "--json", s(&report)]);
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains(": conforms"), "{out}");
    for check in [
        "run batch N vs reference",
        "concurrent runs",
        "invalid arguments refused",
    ] {
        assert_eq!(verdict(&out, "ort-cpu", check), "pass", "{out}");
    }
    for (backend, ep) in [
        ("ort-cuda", "CUDAExecutionProvider"),
        ("ort-tensorrt", "TensorrtExecutionProvider"),
    ] {
        let r = row(&out, backend, "backend checks");
        assert!(
            r.starts_with("skip")
                && r.contains("SKIPPED: cannot run on this machine")
                && r.contains(&format!("has no {ep}")),
            "{r}"
        );
    }
    let r = json(&report);
    assert_eq!(
        (r["failed"].as_u64(), r["skipped"].as_u64()),
        (Some(0), Some(2)),
        "{out}"
    );

    let o = infl8_ort(&["plugin", "check", s(&lib), "--require-all"]);
    let out = stdout(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("DOES NOT CONFORM"), "{out}");
    let r = row(&out, "ort-cuda", "backend checks");
    assert!(
        r.starts_with("FAIL") && r.contains("cannot run on this machine (--require-all)"),
        "{r}"
    );
    assert_eq!(verdict(&out, "ort-cpu", "concurrent runs"), "pass", "{out}");
}

/// With no ONNX Runtime anywhere, nothing of the ort library can run: every
/// backend is skipped, and a library none of whose backends ran does not
/// conform (skips prove nothing).
#[test]
fn a_library_none_of_whose_backends_can_run_does_not_conform() {
    let dir = tempfile::tempdir().unwrap();
    let lib = plugin_lib("infl8_ort");
    let o = infl8_suite::command("infl8")
        .args(["plugin", "check", s(&lib)])
        .env("INFL8_PLUGIN_DIRS", infl8_suite::target_dir())
        .env_remove("ORT_DYLIB_PATH")
        .env("XDG_DATA_HOME", dir.path())
        .env("HOME", dir.path())
        .output()
        .unwrap();
    let out = stdout(&o);
    assert!(!o.status.success(), "{out}");
    let r = row(&out, "ort-cpu", "backend checks");
    assert!(
        r.starts_with("skip") && r.contains("cannot load ONNX Runtime"),
        "{r}"
    );
    assert!(
        out.contains("note: no backend of this library ran its checks here")
            && out.contains("DOES NOT CONFORM"),
        "{out}"
    );
}

#[test]
fn misbehaving_plugin_fails_the_right_checks() {
    let lib = plugin_lib("infl8test_faulty");
    let o = infl8(&["plugin", "check", s(&lib)]);
    let out = stdout(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("DOES NOT CONFORM"), "{out}");
    // The library itself is well formed...
    assert_eq!(verdict(&out, "(library)", "metadata"), "pass", "{out}");
    // ...a panic is contained by the plugin's glue and reported as PANIC...
    let load = row(&out, "faulty-panic-load", "load reference model");
    assert!(load.starts_with("FAIL") && load.contains("PANIC"), "{load}");
    // ...an inconsistent tensor is caught at the ABI...
    let bad = row(&out, "faulty-bad-output", "run batch 1");
    assert!(
        bad.starts_with("FAIL") && bad.contains("but the buffer holds"),
        "{bad}"
    );
    // ...and an error where a shape refusal belongs is named.
    let shape = row(&out, "faulty-error", "wrong input shape");
    assert!(
        shape.starts_with("FAIL") && shape.contains("expected SHAPE_MISMATCH"),
        "{shape}"
    );
}

#[test]
fn plugin_of_another_abi_major_fails() {
    let lib = plugin_lib("infl8test_future_abi");
    let o = infl8(&["plugin", "check", s(&lib)]);
    let out = stdout(&o);
    assert!(!o.status.success(), "{out}");
    let row = row(&out, "(library)", "entry accepts the host ABI");
    assert!(
        row.starts_with("FAIL") && row.contains("plugin ABI 99.0"),
        "{row}"
    );
}

#[test]
fn crashing_and_hanging_plugins_are_contained() {
    let lib = plugin_lib("infl8test_crashing");
    let o = infl8(&["plugin", "check", s(&lib), "--timeout", "3"]);
    let out = stdout(&o);
    assert!(!o.status.success(), "{out}");
    let abort = row(&out, "crash-abort", "run batch 1");
    assert!(
        abort.starts_with("FAIL") && abort.contains("SIGABRT"),
        "{abort}"
    );
    let hang = row(&out, "crash-hang", "run batch 1");
    assert!(hang.starts_with("FAIL") && hang.contains("hangs"), "{hang}");
    // The kit resumed after each crash: checks after the crashing ones ran.
    assert_eq!(
        verdict(&out, "crash-abort", "missing model file refused"),
        "pass",
        "{out}"
    );
    assert_eq!(
        verdict(&out, "crash-hang", "invalid arguments refused"),
        "pass",
        "{out}"
    );
    assert!(out.contains("DOES NOT CONFORM"), "{out}");
}

#[test]
fn missing_library_is_a_clear_error() {
    let o = infl8(&["plugin", "check", "/nonexistent/libinfl8_x.so"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/nonexistent/libinfl8_x.so") && err.contains("does not exist"),
        "{err}"
    );
}
