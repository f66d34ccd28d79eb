//! The plugin host against real shared libraries: the tract plugin, a
//! deliberately faulty one and one from a future ABI.
//!
//! The libraries are built by `cargo build --workspace`, not by this test
//! (cargo builds a test's dependencies, and cdylibs are not dependencies), so
//! the test looks for them next to its own executable and fails with
//! instructions if they are missing.

use std::path::{Path, PathBuf};

use infl8_core::backend::{BackendError, Dim, LoadOptions};
use infl8_core::plugin::abi::{INFL8_ABI_VERSION, version_string};
use infl8_core::plugin::{PluginError, PluginHost};

/// `target/<profile>`, derived from this test's executable
/// (`target/<profile>/deps/plugin_host-<hash>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// The built library for a crate's `[lib] name`.
fn library(lib_name: &str) -> PathBuf {
    let file = format!(
        "{}{lib_name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let path = profile_dir().join(&file);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace` first (the plugin libraries are not \
         built by `cargo test`)",
        path.display()
    );
    path
}

fn tract_library() -> PathBuf {
    library("infl8_tract")
}

/// The backend suite's Conv3d fixture (`infl8_onnx::examples::conv3d_model`),
/// written into a temporary directory that lives as long as this value.
struct Conv3dModel {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn conv3d_model() -> Conv3dModel {
    let dir = tempfile::tempdir().expect("temp dir");
    let path =
        infl8_backend_suite::fixture(dir.path(), infl8_onnx::builder::Dim::Symbolic("batch"));
    Conv3dModel { _dir: dir, path }
}

use infl8_onnx::examples::conv3d_reference as reference;

fn input(batch: usize, seed: usize) -> Vec<f32> {
    (0..batch * 64)
        .map(|i| ((i * 7 + seed) % 11) as f32 * 0.5 - 2.0)
        .collect()
}

use infl8_backend_suite::assert_close;

/// Loads the conv3d model with tract from `host` and checks batches 1 and 5.
fn check_tract(host: &PluginHost, threads: usize) {
    let backend = host.backend("tract").expect("tract backend");
    let opts = LoadOptions {
        threads,
        ..Default::default()
    };
    let onnx = conv3d_model();
    let model = backend.load(&onnx.path, &opts).expect("load the model");
    assert_eq!(model.input().name, "image");
    assert_eq!(model.output().name, "logits");
    assert_eq!(
        model.input().shape,
        [
            Dim::Symbolic("N".into()),
            Dim::Fixed(1),
            Dim::Fixed(4),
            Dim::Fixed(4),
            Dim::Fixed(4)
        ]
    );
    assert_eq!(
        model.output().shape,
        [
            Dim::Symbolic("N".into()),
            Dim::Fixed(2),
            Dim::Fixed(4),
            Dim::Fixed(4),
            Dim::Fixed(4)
        ]
    );
    for batch in [1, 5] {
        let x = input(batch, threads);
        let out = model.run(&x, &[batch, 1, 4, 4, 4]).expect("run");
        assert_eq!(out.shape(), &[batch, 2, 4, 4, 4]);
        assert_close(out.data(), &reference(&x, batch));
    }
}

#[test]
fn tract_plugin_runs_conv3d() {
    let mut host = PluginHost::new(vec![]);
    let summary = host
        .load_library(tract_library())
        .expect("load tract plugin");
    assert_eq!(summary.plugin, "tract");
    assert_eq!(summary.abi, version_string(INFL8_ABI_VERSION));
    // The default build carries the GPU backend too (cargo feature `cuda`).
    assert_eq!(summary.backends, ["tract", "tract-cuda"]);
    for threads in [1, 3] {
        check_tract(&host, threads);
    }
}

#[test]
fn tract_model_is_shared_across_threads() {
    let mut host = PluginHost::new(vec![]);
    host.load_library(tract_library())
        .expect("load tract plugin");
    let opts = LoadOptions {
        threads: 2,
        ..Default::default()
    };
    let onnx = conv3d_model();
    let model = host
        .backend("tract")
        .unwrap()
        .load(&onnx.path, &opts)
        .unwrap();
    std::thread::scope(|s| {
        for t in 0..4 {
            let model = &model;
            s.spawn(move || {
                for round in 0..3 {
                    let batch = 1 + (t + round) % 3;
                    let x = input(batch, t * 10 + round);
                    let out = model.run(&x, &[batch, 1, 4, 4, 4]).unwrap();
                    assert_close(out.data(), &reference(&x, batch));
                }
            });
        }
    });
}

#[test]
fn tract_reports_clear_errors() {
    let mut host = PluginHost::new(vec![]);
    host.load_library(tract_library())
        .expect("load tract plugin");
    let tract = host.backend("tract").unwrap();

    let missing = Path::new("/nonexistent/model.onnx");
    let e = tract.load(missing, &LoadOptions::default()).err().unwrap();
    assert!(matches!(e, BackendError::Load { .. }), "{e:?}");
    assert!(e.to_string().contains("/nonexistent/model.onnx"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.onnx");
    std::fs::write(&corrupt, b"\x08\x07not an onnx model\xff\xff").unwrap();
    let e = tract.load(&corrupt, &LoadOptions::default()).err().unwrap();
    assert!(matches!(e, BackendError::Load { .. }), "{e:?}");
    assert!(e.to_string().contains("corrupt.onnx"), "{e}");

    let onnx = conv3d_model();
    let model = tract.load(&onnx.path, &LoadOptions::default()).unwrap();
    let e = model
        .run(&vec![0.0; 2 * 125], &[2, 1, 5, 5, 5])
        .unwrap_err();
    assert!(matches!(e, BackendError::Shape { .. }), "{e:?}");
}

#[test]
fn discovery_lists_tract_only() {
    let mut host = PluginHost::new(vec![profile_dir()]);
    tract_library(); // fail with instructions if the workspace is not built
    let found = host.discover();
    let tract = found
        .iter()
        .find(|(_, r)| r.as_ref().is_ok_and(|s| s.plugin == "tract"))
        .unwrap_or_else(|| panic!("tract not discovered in {found:?}"));
    assert!(PluginHost::is_plugin_file_name(&tract.0));
    // The test plugins are named `infl8test_*` precisely so that discovery
    // never picks them up.
    for (path, _) in &found {
        let name = path.file_name().unwrap().to_string_lossy();
        assert!(!name.contains("infl8test"), "discovered {name}");
    }
    let backends = host.backends();
    let info = backends
        .iter()
        .find(|b| b.name == "tract")
        .expect("tract listed");
    assert_eq!(info.plugin, "tract");
    assert!(!info.description.is_empty());
    assert!(PluginHost::is_plugin_file_name(&info.library));
    // A second pass reloads nothing and still reports the library once.
    let again = host.discover();
    assert_eq!(
        again
            .iter()
            .filter(|(_, r)| r.as_ref().is_ok_and(|s| s.plugin == "tract"))
            .count(),
        1,
        "{again:#?}"
    );
    assert_eq!(host.backends().len(), backends.len());
    check_tract(&host, 2);
}

#[test]
fn future_abi_is_refused_and_host_keeps_running() {
    let mut host = PluginHost::new(vec![]);
    let future = library("infl8test_future_abi");
    let e = host.load_library(&future).unwrap_err();
    assert!(matches!(e, PluginError::AbiMismatch { .. }), "{e:?}");
    let text = e.to_string();
    let file = future.file_name().unwrap().to_string_lossy().into_owned();
    let host_abi = format!("ABI {}", version_string(INFL8_ABI_VERSION));
    for needle in [file.as_str(), "future-abi", "99.0.0", "ABI 99.0", &host_abi] {
        assert!(text.contains(needle), "{needle:?} missing from: {text}");
    }
    assert!(host.backends().is_empty());

    host.load_library(tract_library()).unwrap();
    check_tract(&host, 1);
}

#[test]
fn panics_become_errors_and_host_keeps_running() {
    let mut host = PluginHost::new(vec![]);
    let summary = host.load_library(library("infl8test_faulty")).unwrap();
    assert_eq!(
        summary.backends,
        [
            "faulty-panic-load",
            "faulty-panic-run",
            "faulty-error",
            "faulty-bad-output",
            "faulty-marker"
        ]
    );
    host.load_library(tract_library()).unwrap();
    let any = Path::new("unused.onnx");
    let opts = LoadOptions::default();

    let e = host
        .backend("faulty-panic-load")
        .unwrap()
        .load(any, &opts)
        .err()
        .unwrap();
    match &e {
        BackendError::Panic(m) => assert!(m.contains("deliberate panic while loading"), "{m}"),
        other => panic!("expected a panic error, got {other:?}"),
    }

    let model = host
        .backend("faulty-panic-run")
        .unwrap()
        .load(any, &opts)
        .unwrap();
    for _ in 0..3 {
        match model.run(&[0.0; 8], &[2, 4]) {
            Err(BackendError::Panic(m)) => {
                assert!(m.contains("deliberate panic while running"), "{m}")
            }
            other => panic!("expected a panic error, got {other:?}"),
        }
    }
    drop(model);

    check_tract(&host, 2);
}

#[test]
fn plugin_errors_cross_with_their_message() {
    let mut host = PluginHost::new(vec![]);
    host.load_library(library("infl8test_faulty")).unwrap();
    let faulty = host.backend("faulty-error").unwrap();
    let path = Path::new("some/model.onnx");

    let mut failing = LoadOptions::default();
    failing.extra.insert("fail".into(), true.into());
    match faulty.load(path, &failing) {
        Err(BackendError::Load { path, message }) => {
            assert_eq!(path, "some/model.onnx");
            assert_eq!(message, "faulty-error: deliberate load failure");
        }
        other => panic!("expected a load error, got {:?}", other.err()),
    }

    let model = faulty.load(path, &LoadOptions::default()).unwrap();
    match model.run(&[0.0; 4], &[1, 4]) {
        Err(BackendError::Run(m)) => assert_eq!(m, "faulty-error: deliberate run failure"),
        other => panic!("expected a run error, got {other:?}"),
    }
    // The host checks shapes before the plugin sees them.
    assert!(matches!(
        model.run(&[0.0; 3], &[1, 3]),
        Err(BackendError::Shape { .. })
    ));
}

#[test]
fn marker_backend_segments_and_refuses_only_marked_windows() {
    let mut host = PluginHost::new(vec![]);
    host.load_library(library("infl8test_faulty")).unwrap();
    let marker = host.backend("faulty-marker").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let model_file = dir.path().join("m.onnx");
    std::fs::write(&model_file, b"not read").unwrap();
    // The soak test relies on a missing model failing at load, like a real
    // backend, so the service refuses to start rather than failing inputs.
    assert!(matches!(
        marker.load(&dir.path().join("none.onnx"), &LoadOptions::default()),
        Err(BackendError::Load { .. })
    ));
    let mut opts = LoadOptions::default();
    opts.extra.insert("marker_above".into(), 10.0.into());
    let model = marker.load(&model_file, &opts).unwrap();
    // Any window size: a 2x2x1 window, batch 2.
    let clean = [-1.0, 0.5, 2.0, -0.25, 3.0, -3.0, 0.0, 9.0];
    let out = model.run(&clean, &[2, 1, 2, 2, 1]).unwrap();
    assert_eq!(out.shape(), [2, 2, 2, 2, 1]);
    let data = out.data();
    // Item 0: background logits 0, foreground = intensity; then item 1.
    assert_eq!(&data[..8], &[0.0, 0.0, 0.0, 0.0, -1.0, 0.5, 2.0, -0.25]);
    assert_eq!(&data[8..], &[0.0, 0.0, 0.0, 0.0, 3.0, -3.0, 0.0, 9.0]);
    let mut marked = clean;
    marked[6] = 11.0;
    match model.run(&marked, &[2, 1, 2, 2, 1]) {
        Err(BackendError::Run(m)) => assert!(m.contains("marker value 11"), "{m}"),
        other => panic!(
            "expected a run error, got {:?}",
            other.map(|t| t.shape().to_vec())
        ),
    }
    let mut bad = LoadOptions::default();
    bad.extra.insert("marker_above".into(), "high".into());
    assert!(matches!(
        marker.load(&model_file, &bad),
        Err(BackendError::Load { .. })
    ));
}

#[test]
fn bad_output_is_refused() {
    let mut host = PluginHost::new(vec![]);
    let lib = library("infl8test_faulty");
    host.load_library(&lib).unwrap();
    let model = host
        .backend("faulty-bad-output")
        .unwrap()
        .load(Path::new("unused.onnx"), &LoadOptions::default())
        .unwrap();
    for _ in 0..3 {
        match model.run(&[1.0; 8], &[2, 4]) {
            Err(BackendError::Run(m)) => {
                assert!(m.contains("invalid output"), "{m}");
                assert!(m.contains("needs 8 values but the buffer holds 7"), "{m}");
                assert!(
                    m.contains(&*lib.file_name().unwrap().to_string_lossy()),
                    "{m}"
                );
            }
            other => panic!("expected the output refused, got {other:?}"),
        }
    }
}

#[test]
fn missing_library_and_backend_are_clear() {
    let mut host = PluginHost::new(vec![PathBuf::from("/nonexistent/plugins")]);
    let e = host
        .load_library("/nonexistent/plugins/libinfl8_nope.so")
        .unwrap_err();
    assert!(matches!(e, PluginError::NotFound { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("/nonexistent/plugins/libinfl8_nope.so"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let not_a_library = dir.path().join("libinfl8_fake.so");
    std::fs::write(&not_a_library, b"not an ELF file").unwrap();
    let e = host.load_library(&not_a_library).unwrap_err();
    assert!(matches!(e, PluginError::Open { .. }), "{e:?}");
    assert!(e.to_string().contains("libinfl8_fake.so"), "{e}");

    host.load_library(tract_library()).unwrap();
    let e = host.backend("cuda").err().unwrap();
    let text = e.to_string();
    assert!(text.contains("`cuda`"), "{text}");
    assert!(text.contains("tract ("), "{text}");
    assert!(text.contains("/nonexistent/plugins"), "{text}");
}

#[test]
fn broken_libraries_do_not_stop_discovery() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(format!(
            "{}infl8_broken{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        )),
        b"garbage",
    )
    .unwrap();
    std::fs::copy(
        tract_library(),
        dir.path().join(tract_library().file_name().unwrap()),
    )
    .unwrap();
    let mut host = PluginHost::new(vec![dir.path().to_path_buf()]);
    let found = host.discover();
    assert!(
        found
            .iter()
            .any(|(p, r)| p.to_string_lossy().contains("infl8_broken") && r.is_err()),
        "{found:?}"
    );
    assert!(
        host.backends().iter().any(|b| b.name == "tract"),
        "{found:?}"
    );
}

/// A C library in `dir` named `libinfl8_<stem>.so` whose constructor creates
/// the file `marker` (so a test sees whether it was ever opened), exporting
/// the entry symbol (which fails) when `with_entry`.
fn spy_library(dir: &Path, stem: &str, marker: &Path, with_entry: bool) -> PathBuf {
    let src = dir.join(format!("{stem}.c"));
    let mut code = String::from(
        "#include <stdio.h>\n\
         __attribute__((constructor)) static void opened(void) {\n\
             FILE *f = fopen(MARKER, \"w\"); if (f) fclose(f);\n\
         }\n",
    );
    if with_entry {
        code.push_str(
            "__attribute__((visibility(\"default\"))) int infl8_plugin_entry(\n\
                 unsigned v, const void *api, const void **table) {\n\
                 (void)v; (void)api; *table = 0; return 1;\n\
             }\n",
        );
    } else {
        code.push_str("int not_a_plugin(void) { return 1; }\n");
    }
    std::fs::write(&src, code).unwrap();
    let lib = dir.join(format!(
        "{}infl8_{stem}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    let define = format!("-DMARKER=\"{}\"", marker.display());
    infl8_suite::compile_c(&["-shared", "-fPIC", &define], &lib, &[src], stem);
    lib
}

fn open_reason(e: PluginError) -> String {
    match e {
        PluginError::Open { message, .. } => message,
        other => panic!("expected an Open error, got {other:?}"),
    }
}

#[cfg(target_os = "linux")]
#[test]
fn plugin_files_are_checked_before_they_are_opened() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = PluginHost::new(vec![]);
    let file = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let empty = file("libinfl8_empty.so", b"");
    assert_eq!(
        open_reason(host.load_library(&empty).unwrap_err()),
        "the file is empty"
    );
    let text = file("libinfl8_text.so", b"#!/bin/sh\nexit 0\n");
    let why = open_reason(host.load_library(&text).unwrap_err());
    assert!(why.starts_with("not an ELF shared library"), "{why}");

    // The tract plugin, marked as built for another machine.
    let mut tract = std::fs::read(tract_library()).unwrap();
    let mips: u16 = 8;
    tract[18..20].copy_from_slice(&mips.to_le_bytes());
    let foreign = file("libinfl8_foreign.so", &tract);
    let why = open_reason(host.load_library(&foreign).unwrap_err());
    assert!(why.contains("built for mips"), "{why}");

    // Cut short: refused from its headers (the loader would map segments
    // past the end and die of SIGBUS).
    let tract = std::fs::read(tract_library()).unwrap();
    let cut = file("libinfl8_cut.so", &tract[..64 << 10]);
    let why = open_reason(host.load_library(&cut).unwrap_err());
    assert!(why.starts_with("a truncated ELF file"), "{why}");

    // What only the loader can tell (a missing dependency) comes with the
    // loader's own reason (dlerror) instead of "dlopen failed".
    let dep_src = dir.path().join("dep.c");
    std::fs::write(&dep_src, "int dep_value(void) { return 7; }\n").unwrap();
    let dep = dir.path().join("libinfl8testdep.so");
    infl8_suite::compile_c(&["-shared", "-fPIC"], &dep, &[dep_src], "dep");
    let needy_src = dir.path().join("needy.c");
    std::fs::write(
        &needy_src,
        "int dep_value(void);\n\
         __attribute__((visibility(\"default\"))) int infl8_plugin_entry(\n\
             unsigned v, const void *api, const void **table) {\n\
             (void)v; (void)api; *table = 0; return dep_value();\n\
         }\n",
    )
    .unwrap();
    let needy = dir.path().join("libinfl8_needy.so");
    let libdir = format!("-L{}", dir.path().display());
    infl8_suite::compile_c(
        &[
            "-shared",
            "-fPIC",
            "-Wl,--no-as-needed",
            &libdir,
            "-linfl8testdep",
        ],
        &needy,
        &[needy_src],
        "needy",
    );
    std::fs::remove_file(&dep).unwrap();
    let why = open_reason(host.load_library(&needy).unwrap_err());
    assert!(
        why.contains("libinfl8testdep.so") && !why.contains("dlopen failed"),
        "{why}"
    );

    // A real shared library without the entry: refused from its symbol
    // table, and never opened (its constructor did not run).
    let marker = dir.path().join("opened");
    let plain = spy_library(dir.path(), "plain", &marker, false);
    let e = host.load_library(&plain).unwrap_err();
    assert!(matches!(e, PluginError::NoEntry { .. }), "{e:?}");
    assert!(e.to_string().contains("not opened"), "{e}");
    assert!(!marker.exists(), "the library was opened");

    host.load_library(tract_library()).unwrap();
    check_tract(&host, 1);
}

#[cfg(unix)]
#[test]
fn writable_plugins_are_refused_unless_allowed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let lib = plugins.join(tract_library().file_name().unwrap());
    std::fs::copy(tract_library(), &lib).unwrap();
    let chmod = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };

    chmod(&plugins, 0o777);
    let e = PluginHost::new(vec![]).load_library(&lib).unwrap_err();
    assert!(
        matches!(e, PluginError::InsecurePermissions { .. }),
        "{e:?}"
    );
    let text = e.to_string();
    for needle in [
        "the directory",
        "0777",
        "world-writable",
        "plugins.allow_insecure_permissions",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from: {text}");
    }

    chmod(&plugins, 0o755);
    chmod(&lib, 0o664);
    let e = PluginHost::new(vec![]).load_library(&lib).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("the file") && text.contains("0664") && text.contains("group-writable"),
        "{text}"
    );

    // Discovery reports the refusal and goes on.
    let mut host = PluginHost::new(vec![plugins.clone()]);
    let found = host.discover_for(&["tract".to_string()]);
    assert!(
        found
            .iter()
            .any(|(p, r)| *p == lib && matches!(r, Err(PluginError::InsecurePermissions { .. }))),
        "{found:?}"
    );

    // Allowed: it loads.
    let mut host = PluginHost::new(vec![]).allow_insecure_permissions(true);
    host.load_library(&lib).unwrap();
    check_tract(&host, 1);
}

#[cfg(target_os = "linux")]
#[test]
fn only_the_libraries_of_the_requested_backends_are_opened() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let marker = dir.path().join("spy-opened");
    spy_library(&plugins, "spy", &marker, true);
    std::fs::copy(
        tract_library(),
        plugins.join(tract_library().file_name().unwrap()),
    )
    .unwrap();

    let mut host = PluginHost::new(vec![plugins.clone()]);
    let found = host.discover_for(&["tract".to_string()]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].1.is_ok(), "{found:?}");
    assert!(!marker.exists(), "the spy library was opened for `tract`");
    check_tract(&host, 1);

    // `ort-cpu` is looked for as libinfl8_ort_cpu.so, then libinfl8_ort.so.
    let names = PluginHost::library_names_for("ort-cpu");
    assert_eq!(names, ["libinfl8_ort_cpu.so", "libinfl8_ort.so"]);

    // A backend no library is named after: every library is opened, and
    // the spy's constructor runs (which is what the selective load avoids).
    let found = host.discover_for(&["nobody".to_string()]);
    assert!(marker.exists(), "{found:?}");
    assert!(
        found.iter().any(|(p, r)| p.ends_with("libinfl8_spy.so")
            && matches!(r, Err(PluginError::EntryFailed { .. }))),
        "{found:?}"
    );
}

#[cfg(target_os = "linux")]
#[test]
fn infl8_segment_opens_only_the_backend_it_runs_on() {
    use infl8_suite::{example_model, infl8, ok, s, segment, t1_2mm};
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let marker = dir.path().join("spy-opened");
    spy_library(&plugins, "spy", &marker, true);
    let model = example_model(dir.path(), 48);
    let out = dir.path().join("out.nii.gz");
    ok(&segment(
        &model,
        &t1_2mm(),
        &out,
        &["--backend", "tract", "--plugin-dir", s(&plugins)],
    ));
    let labels = infl8_core::nifti_io::read_volume(&out, &Default::default()).unwrap();
    assert!(labels.data.iter().any(|&v| v == 1.0));
    assert!(
        !marker.exists(),
        "segment --backend tract opened the spy library"
    );
    // `infl8 plugins` lists everything, so it opens everything.
    let r = infl8(&["plugins", "--plugin-dir", s(&plugins)]);
    assert!(marker.exists());
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        text.contains("refused:") && text.contains("libinfl8_spy.so"),
        "{text}"
    );
}
