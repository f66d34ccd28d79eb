//! The ort plugin (`libinfl8_ort`) from its shared library, on the CPU
//! ONNX Runtime that `scripts/fetch-ort.sh` fetches: the same numbers as
//! tract, end to end on a real MRI, clean errors for a missing library and
//! for GPU backends on a machine (or an ONNX Runtime) without a GPU, and
//! fallback chains.
//!
//! In process the library is handed over as the `library` load option; the
//! `infl8` runs get it as `ORT_DYLIB_PATH` (see `infl8_suite::infl8_ort`).

use std::path::Path;

use infl8_core::backend::LoadOptions;
use infl8_core::nifti_io::{self, ReadLimits};
use infl8_core::plugin::PluginHost;
use infl8_onnx::builder::{Attr, Dim as OnnxDim, GraphBuilder};
use infl8_onnx::examples::pseudo_random as values;
use infl8_suite::{
    example_model, infl8, infl8_ort, ok, ort_library, plugin_lib, run_with_env, s, segment, t1_2mm,
};

fn host() -> PluginHost {
    let mut host = PluginHost::new(vec![]);
    host.load_library(plugin_lib("infl8_tract")).unwrap();
    let ort = host.load_library(plugin_lib("infl8_ort")).unwrap();
    assert_eq!(ort.backends, ["ort-cpu", "ort-cuda", "ort-tensorrt"]);
    host
}

fn ort_options() -> LoadOptions {
    let mut o = LoadOptions {
        threads: 2,
        ..Default::default()
    };
    o.extra.insert("library".into(), s(&ort_library()).into());
    o
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs one batch on tract and on ort-cpu and checks the logits agree.
fn same_logits(model_path: &Path, item_shape: &[usize], batch: usize) {
    let host = host();
    let tract = host
        .backend("tract")
        .unwrap()
        .load(model_path, &LoadOptions::default())
        .unwrap();
    let ort = host
        .backend("ort-cpu")
        .unwrap()
        .load(model_path, &ort_options())
        .unwrap();
    assert_eq!(ort.input().name, tract.input().name);
    assert_eq!(ort.input().shape, tract.input().shape);
    assert_eq!(ort.output().shape[1..], tract.output().shape[1..]);

    let mut shape = vec![batch];
    shape.extend_from_slice(item_shape);
    let input = values(shape.iter().product(), 7, -1.0, 2.0);
    let a = tract.run(&input, &shape).unwrap();
    let b = ort.run(&input, &shape).unwrap();
    assert_eq!(a.shape(), b.shape());
    let d = max_abs_diff(a.data(), b.data());
    assert!(d <= 1e-4, "tract and ort-cpu differ by {d}");
    let scale = a.data().iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(scale > 1e-2, "degenerate test: all logits are ~0");
}

#[test]
fn ort_cpu_and_tract_give_the_same_logits_on_the_example_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 32);
    same_logits(&model, &[1, 32, 32, 32], 3);
}

/// A small model with the ops of infl8's exported ViTs: patch-embedding
/// Conv, Reshape/Transpose with a symbolic batch, LayerNormalization,
/// attention (MatMul, Softmax), a residual Add and a ConvTranspose head.
fn attention_model(dir: &Path) -> std::path::PathBuf {
    let (c, tokens) = (8i64, 64i64);
    let mut g = GraphBuilder::new("tiny_attention");
    let n = OnnxDim::Symbolic("batch");
    let x = g.input(
        "image",
        &[
            n.clone(),
            OnnxDim::Fixed(1),
            OnnxDim::Fixed(8),
            OnnxDim::Fixed(8),
            OnnxDim::Fixed(8),
        ],
    );
    let w1 = g.weight("patch_w", &[c, 1, 2, 2, 2], &values(64, 1, -0.5, 0.5));
    let b1 = g.weight("patch_b", &[c], &values(8, 2, -0.1, 0.1));
    let conv = g.node(
        "Conv",
        &[&x, &w1, &b1],
        vec![
            ("kernel_shape", Attr::Ints(vec![2, 2, 2])),
            ("strides", Attr::Ints(vec![2, 2, 2])),
        ],
    );
    let flat_shape = g.weight_i64("flat_shape", &[3], &[0, c, tokens]);
    let flat = g.node("Reshape", &[&conv, &flat_shape], vec![]);
    let tok = g.node(
        "Transpose",
        &[&flat],
        vec![("perm", Attr::Ints(vec![0, 2, 1]))],
    );
    let gamma = g.weight("ln_g", &[c], &values(8, 3, 0.5, 1.5));
    let beta = g.weight("ln_b", &[c], &values(8, 4, -0.2, 0.2));
    let ln = g.node(
        "LayerNormalization",
        &[&tok, &gamma, &beta],
        vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(1e-5))],
    );
    let proj = |g: &mut GraphBuilder, name: &str, seed: u64| {
        let w = g.weight(name, &[c, c], &values(64, seed, -0.6, 0.6));
        g.node("MatMul", &[&ln, &w], vec![])
    };
    let q = proj(&mut g, "wq", 5);
    let k = proj(&mut g, "wk", 6);
    let v = proj(&mut g, "wv", 7);
    let kt = g.node(
        "Transpose",
        &[&k],
        vec![("perm", Attr::Ints(vec![0, 2, 1]))],
    );
    let scores = g.node("MatMul", &[&q, &kt], vec![]);
    let scale = g.weight("scale", &[1], &[1.0 / (c as f32).sqrt()]);
    let scaled = g.node("Mul", &[&scores, &scale], vec![]);
    let attn = g.node("Softmax", &[&scaled], vec![("axis", Attr::Int(-1))]);
    let mixed = g.node("MatMul", &[&attn, &v], vec![]);
    let res = g.node("Add", &[&tok, &mixed], vec![]);
    let back = g.node(
        "Transpose",
        &[&res],
        vec![("perm", Attr::Ints(vec![0, 2, 1]))],
    );
    let grid_shape = g.weight_i64("grid_shape", &[5], &[0, c, 4, 4, 4]);
    let grid = g.node("Reshape", &[&back, &grid_shape], vec![]);
    let w2 = g.weight("head_w", &[c, 2, 2, 2, 2], &values(128, 8, -0.5, 0.5));
    let b2 = g.weight("head_b", &[2], &[0.25, -0.25]);
    g.node(
        "ConvTranspose",
        &[&grid, &w2, &b2],
        vec![
            ("kernel_shape", Attr::Ints(vec![2, 2, 2])),
            ("strides", Attr::Ints(vec![2, 2, 2])),
        ],
    );
    g.rename_last_output("logits");
    g.output(
        "logits",
        &[
            n,
            OnnxDim::Fixed(2),
            OnnxDim::Fixed(8),
            OnnxDim::Fixed(8),
            OnnxDim::Fixed(8),
        ],
    );
    let path = dir.join("attention.onnx");
    infl8_onnx::write_model(&g.finish("infl8 tests"), &path).unwrap();
    path
}

#[test]
fn ort_cpu_and_tract_give_the_same_logits_on_an_attention_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = attention_model(dir.path());
    same_logits(&model, &[1, 8, 8, 8], 4);
}

/// `infl8 segment` on tract and on ort-cpu: same labels, logits within 1e-4.
#[test]
fn segment_on_ort_cpu_matches_tract_on_a_real_mri() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 48);
    let input = t1_2mm();
    let run = |backend: &str| {
        let out = dir.path().join(format!("{backend}.nii.gz"));
        let logits = dir.path().join(format!("{backend}-logits.nii.gz"));
        let args = [
            "segment",
            "--model",
            s(&model),
            "--input",
            s(&input),
            "--output",
            s(&out),
            "--save-logits",
            s(&logits),
            "--backend",
            backend,
            "--threads",
            "2",
        ];
        ok(&infl8_ort(&args));
        let limits = ReadLimits::default();
        (
            nifti_io::read_volume(&out, &limits).unwrap(),
            nifti_io::read_volume(&logits, &limits).unwrap(),
        )
    };
    let (labels_t, logits_t) = run("tract");
    let (labels_o, logits_o) = run("ort-cpu");
    assert_eq!(labels_o.dims(), labels_t.dims());
    let differ = labels_t
        .data
        .iter()
        .zip(labels_o.data.iter())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differ, 0, "{differ} voxels labelled differently");
    let head = labels_o.data.iter().filter(|&&l| l == 1.0).count();
    assert!(head > labels_o.data.len() / 4, "head voxels: {head}");
    let d = max_abs_diff(
        logits_t.data.as_slice().unwrap(),
        logits_o.data.as_slice().unwrap(),
    );
    assert!(d <= 1e-4, "logits differ by {d}");
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A failed command: non-zero exit, no panic, no output file.
fn failed_cleanly(out: &std::process::Output, output_file: &Path) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !output_file.exists(),
        "{} was written",
        output_file.display()
    );
    err
}

#[test]
fn a_missing_or_broken_onnx_runtime_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 32);
    let out = dir.path().join("mask.nii.gz");
    let segment_ort = |lib: &Path| {
        run_with_env(
            "infl8",
            &[
                "segment",
                "--model",
                s(&model),
                "--input",
                s(&t1_2mm()),
                "--output",
                s(&out),
                "--backend",
                "ort-cpu",
            ],
            &[("ORT_DYLIB_PATH", lib.as_os_str())],
        )
    };

    let missing = dir.path().join("nowhere/libonnxruntime.so");
    let err = failed_cleanly(&segment_ort(&missing), &out);
    assert!(
        err.contains(s(&missing))
            && err.contains("does not exist")
            && err.contains("ORT_DYLIB_PATH"),
        "{err}"
    );

    let broken = dir.path().join("libonnxruntime.so");
    std::fs::write(&broken, b"not a shared library").unwrap();
    let err = failed_cleanly(&segment_ort(&broken), &out);
    assert!(
        err.contains("cannot load ONNX Runtime") && err.contains(s(&broken)),
        "{err}"
    );
}

/// This machine's ONNX Runtime (the CPU wheel) has neither CUDA nor
/// TensorRT: the GPU backends fail cleanly, naming what is missing, and
/// never quietly run on CPU.
#[test]
fn gpu_backends_fail_cleanly_without_their_execution_provider() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 32);
    let out = dir.path().join("mask.nii.gz");
    for (backend, ep) in [
        ("ort-cuda", "CUDAExecutionProvider"),
        ("ort-tensorrt", "TensorrtExecutionProvider"),
    ] {
        let r = infl8_ort(&[
            "segment",
            "--model",
            s(&model),
            "--input",
            s(&t1_2mm()),
            "--output",
            s(&out),
            "--backend",
            backend,
        ]);
        let err = failed_cleanly(&r, &out);
        assert!(
            err.contains(&format!("backend `{backend}`")) && err.contains(&format!("has no {ep}")),
            "{err}"
        );
        assert!(err.contains(s(&ort_library())), "{err}");
    }
}

#[test]
fn a_fallback_chain_logs_each_fallback_and_runs_on_the_first_that_loads() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 32);
    let reference = dir.path().join("tract.nii.gz");
    ok(&segment(&model, &t1_2mm(), &reference, &[]));

    let out = dir.path().join("chain.nii.gz");
    let r = infl8_ort(&[
        "segment",
        "--model",
        s(&model),
        "--input",
        s(&t1_2mm()),
        "--output",
        s(&out),
        "--backend",
        "ort-tensorrt,ort-cuda,tract",
    ]);
    ok(&r);
    let err = stderr(&r);
    assert!(
        err.contains("backend `ort-tensorrt` cannot run")
            && err.contains("falling back to `ort-cuda`")
            && err.contains("TensorrtExecutionProvider"),
        "{err}"
    );
    assert!(
        err.contains("backend `ort-cuda` cannot run")
            && err.contains("falling back to `tract`")
            && err.contains("CUDAExecutionProvider"),
        "{err}"
    );
    // Both files must exist (two missing files are not "equal"), the chain's
    // bytes must be tract's, and the mask must be a real one.
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(
        read(&out) == read(&reference),
        "the chain's output is not tract's"
    );
    let mask = nifti_io::read_volume(&out, &ReadLimits::default()).unwrap();
    let head = mask.data.iter().filter(|v| **v == 1.0).count();
    assert!(head > 0 && head < mask.data.len(), "{head} head voxels");

    // Nothing in the chain can run: every reason, no output.
    let out = dir.path().join("none.nii.gz");
    let r = infl8_ort(&[
        "segment",
        "--model",
        s(&model),
        "--input",
        s(&t1_2mm()),
        "--output",
        s(&out),
        "--backend",
        "ort-cuda,no-such-backend",
    ]);
    let err = failed_cleanly(&r, &out);
    assert!(
        err.contains("none of the backends `ort-cuda`, `no-such-backend` could load")
            && err.contains("has no CUDAExecutionProvider")
            && err.contains("no backend named `no-such-backend`"),
        "{err}"
    );
}

/// A firmware profile with a chain and the library in `backend_options`:
/// no environment variable needed.
#[test]
fn a_profile_names_the_chain_and_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 32);
    let profile = dir.path().join("gpu-box.toml");
    std::fs::write(
        &profile,
        format!(
            "backends = [\"ort-tensorrt\", \"ort-cpu\"]\nthreads = 2\n\n\
             [backend_options.ort]\nlibrary = \"{}\"\n\n\
             [backend_options.ort-tensorrt]\ntrt_fp16 = true\ntrt_engine_cache_dir = \"{}\"\n",
            s(&ort_library()),
            s(&dir.path().join("trt-cache")),
        ),
    )
    .unwrap();
    let out = dir.path().join("mask.nii.gz");
    let r = run_with_env(
        "infl8",
        &[
            "segment",
            "--config",
            s(&profile),
            "--model",
            s(&model),
            "--input",
            s(&t1_2mm()),
            "--output",
            s(&out),
        ],
        &[("ORT_DYLIB_PATH", "/nonexistent/ignored.so".as_ref())],
    );
    ok(&r);
    let err = stderr(&r);
    assert!(err.contains("falling back to `ort-cpu`"), "{err}");
    assert!(out.is_file());

    let r = infl8_ort(&["info", s(&model), "--load", "--backend", "ort-cpu"]);
    let text = ok(&r);
    assert!(text.contains("loaded on ort-cpu"), "{text}");
    let text = ok(&infl8(&["plugins"]));
    for b in ["ort-cpu", "ort-cuda", "ort-tensorrt"] {
        assert!(text.contains(b), "{text}");
    }
}

/// `infl8 ARGS` with no `ORT_DYLIB_PATH` and the per-user data folder at
/// `data` (`HOME` too, so nothing of this machine's user leaks in).
fn infl8_without_env(args: &[&str], data: &Path) -> std::process::Output {
    infl8_suite::command("infl8")
        .args(args)
        .env("INFL8_PLUGIN_DIRS", infl8_suite::target_dir())
        .env_remove("ORT_DYLIB_PATH")
        .env("XDG_DATA_HOME", data)
        .env("HOME", data)
        .output()
        .expect("run infl8")
}

/// Where `scripts/fetch-ort.sh` installs ONNX Runtime, the ort plugin finds
/// it with no setting at all; without it, ort-cpu is reported as unable to
/// run here, naming the folders searched.
#[test]
fn ort_cpu_finds_onnx_runtime_in_the_user_data_folder() {
    let dir = tempfile::tempdir().unwrap();
    let model = example_model(dir.path(), 32);
    let segment_ort = |data: &Path, out: &Path| {
        infl8_without_env(
            &[
                "segment",
                "--model",
                s(&model),
                "--input",
                s(&t1_2mm()),
                "--output",
                s(out),
                "--backend",
                "ort-cpu",
            ],
            data,
        )
    };

    // Nothing installed: a clear error, and `infl8 plugins` says why.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = dir.path().join("none.nii.gz");
    let err = failed_cleanly(&segment_ort(&empty, &out), &out);
    let searched = empty.join("infl8/onnxruntime");
    assert!(
        err.contains("unavailable on this machine")
            && err.contains(s(&searched))
            && err.contains("fetch-ort.sh"),
        "{err}"
    );
    let listing = ok(&infl8_without_env(&["plugins"], &empty));
    let row = |name: &str| {
        listing
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} row in:\n{listing}"))
            .to_owned()
    };
    assert_eq!(
        row("ort-cpu").split_whitespace().nth(2),
        Some("no"),
        "{listing}"
    );
    assert_eq!(
        row("tract").split_whitespace().nth(2),
        Some("yes"),
        "{listing}"
    );
    assert!(
        listing.contains("unavailable: ort-cpu: cannot load ONNX Runtime"),
        "{listing}"
    );

    // The layout fetch-ort.sh makes: infl8/onnxruntime -> a versioned copy.
    let data = dir.path().join("data");
    let versioned = data.join("infl8/onnxruntime-test");
    std::fs::create_dir_all(&versioned).unwrap();
    for f in ["libonnxruntime.so", "libonnxruntime_providers_shared.so"] {
        let src = ort_library().with_file_name(f);
        std::os::unix::fs::symlink(src.canonicalize().unwrap(), versioned.join(f)).unwrap();
    }
    std::os::unix::fs::symlink("onnxruntime-test", data.join("infl8/onnxruntime")).unwrap();
    let out = dir.path().join("ort.nii.gz");
    ok(&segment_ort(&data, &out));
    let tract = dir.path().join("tract.nii.gz");
    ok(&segment(&model, &t1_2mm(), &tract, &[]));
    let limits = ReadLimits::default();
    let (a, b) = (
        nifti_io::read_volume(&out, &limits).unwrap(),
        nifti_io::read_volume(&tract, &limits).unwrap(),
    );
    assert_eq!(a.data, b.data, "ort-cpu and tract labels differ");
    let listing = ok(&infl8_without_env(&["plugins"], &data));
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("ort-cpu") && l.split_whitespace().nth(2) == Some("yes")),
        "{listing}"
    );
    // The GPU backends cannot run on this CPU build, and say why.
    assert!(
        listing.contains("unavailable: ort-cuda: ")
            && listing.contains("has no CUDAExecutionProvider"),
        "{listing}"
    );
}
