//! The ort backends in process (no plugin boundary), on the ONNX Runtime
//! that `scripts/fetch-ort.sh` puts in `.cache/onnxruntime/cpu/` (given as the
//! `library` load option; `ORT_DYLIB_PATH` overrides nothing here): the
//! backend suite (`infl8-backend-suite`: numbers against a plain-loop
//! reference, batching, errors), one library per process, and the GPU
//! backends' clean refusal on an ONNX Runtime without their execution
//! provider.
//!
//! One process holds one ONNX Runtime, so every test here uses the same
//! library; the missing-library case lives in `missing_library.rs`.

use std::path::{Path, PathBuf};

use infl8_backend::{Backend, BackendError, LoadOptions};
use infl8_backend_suite as suite;
use infl8_onnx::builder::Dim as OnnxDim;
use infl8_ort::{OrtBackend, Provider};

/// The CPU ONNX Runtime fetched by `scripts/fetch-ort.sh`.
fn ort_library() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../.cache/onnxruntime/cpu/libonnxruntime.so");
    p.canonicalize().unwrap_or_else(|_| {
        panic!(
            "{} is missing: run `scripts/fetch-ort.sh` first (scripts/test.sh does)",
            p.display()
        )
    })
}

fn opts(threads: usize) -> LoadOptions {
    let mut o = LoadOptions {
        threads,
        ..Default::default()
    };
    o.extra.insert(
        "library".into(),
        ort_library().to_str().expect("UTF-8 path").into(),
    );
    o
}

fn cpu() -> OrtBackend {
    OrtBackend::new(Provider::Cpu)
}

#[test]
fn runs_whole_batches_with_any_thread_count() {
    suite::runs_batches_with_any_thread_count(&cpu(), &opts, &[0, 1, 2]);
}

#[test]
fn models_run_from_several_threads() {
    suite::models_run_from_several_threads(&cpu(), &opts);
}

#[test]
fn a_fixed_batch_of_one_runs_item_by_item() {
    suite::a_fixed_batch_of_one_takes_any_batch(&cpu(), &opts);
}

#[test]
fn a_fixed_batch_above_one_runs_whole() {
    suite::a_fixed_batch_above_one_runs_whole(&cpu(), &opts);
}

#[test]
fn clear_errors() {
    suite::errors_are_clear(&cpu(), &opts);
    // ort's own: a corrupt file's error names it, and a bad option too.
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.onnx");
    std::fs::write(&corrupt, b"this is not protobuf \xff\xff\xff").unwrap();
    let e = cpu().load(&corrupt, &opts(1)).err().unwrap();
    assert!(e.to_string().contains("corrupt.onnx"), "{e}");
    let path = suite::fixture(dir.path(), OnnxDim::Symbolic("batch"));
    let mut bad = opts(1);
    bad.extra.insert("trt_fp16".into(), "maybe".into());
    let e = OrtBackend::new(Provider::TensorRt)
        .load(&path, &bad)
        .err()
        .unwrap();
    assert!(e.to_string().contains("trt_fp16"), "{e}");
}

#[test]
fn another_library_in_the_same_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = suite::fixture(dir.path(), OnnxDim::Symbolic("batch"));
    cpu().load(&path, &opts(1)).unwrap();
    let other = dir.path().join("libonnxruntime.so");
    std::fs::copy(ort_library(), &other).unwrap();
    let mut o = opts(1);
    o.extra
        .insert("library".into(), other.to_str().unwrap().into());
    let e = cpu().load(&path, &o).err().unwrap().to_string();
    eprintln!("{e}");
    assert!(
        e.contains("already loaded") && e.contains(other.to_str().unwrap()),
        "{e}"
    );
}

/// The CPU build of ONNX Runtime has neither CUDA nor TensorRT: the GPU
/// backends say they cannot run here (a typed `Unavailable`, not a load
/// failure), naming the library and what it does offer.
#[test]
fn gpu_backends_refuse_a_cpu_only_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let path = suite::fixture(dir.path(), OnnxDim::Symbolic("batch"));
    for (provider, ep) in [
        (Provider::Cuda, "CUDAExecutionProvider"),
        (Provider::TensorRt, "TensorrtExecutionProvider"),
    ] {
        let e = OrtBackend::new(provider)
            .load(&path, &opts(1))
            .err()
            .unwrap();
        assert!(matches!(e, BackendError::Unavailable(_)), "{e:?}");
        let e = e.to_string();
        eprintln!("{e}");
        assert!(e.contains(provider.backend_name()), "{e}");
        assert!(e.contains(&format!("has no {ep}")), "{e}");
        assert!(e.contains("CPUExecutionProvider"), "{e}");
        assert!(e.contains("libonnxruntime.so"), "{e}");
    }
}
