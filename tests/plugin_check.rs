//! `infl8 plugin check` (the conformance kit) on real plugin libraries: the
//! shipped tract and ort plugins pass; plugins that panic, return errors,
//! hand back inconsistent tensors, speak another ABI, abort the process or
//! hang fail the right checks, and the kit itself survives every one of them.

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
}

#[test]
fn ort_cpu_backend_conforms() {
    let lib = plugin_lib("infl8_ort");
    let o = infl8_ort(&["plugin", "check", s(&lib), "--backend", "ort-cpu"]);
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for check in [
        "run batch N vs tract",
        "concurrent runs",
        "invalid arguments refused",
    ] {
        assert_eq!(verdict(&out, "ort-cpu", check), "pass", "{out}");
    }
    // The GPU backends are listed, not checked, on a machine without a GPU.
    assert_eq!(verdict(&out, "ort-cuda", "backend checks"), "skip", "{out}");
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
