//! A missing or unusable ONNX Runtime library is an error naming the path
//! and the problem, never a crash; the failure is remembered for the
//! process. (Its own test binary: one process loads ONNX Runtime once.)

use infl8_backend::{Backend, BackendError, LoadOptions};
use infl8_ort::{OrtBackend, Provider};

fn with_library(path: &str) -> LoadOptions {
    let mut o = LoadOptions::default();
    o.extra.insert("library".into(), path.into());
    o
}

#[test]
fn missing_and_unusable_libraries_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.onnx");
    std::fs::write(&model, b"not loaded anyway").unwrap();

    // A file that is not a shared library: the loader's complaint, with the
    // path. Tried first, so the process's one load attempt is this one.
    let fake = dir.path().join("libonnxruntime.so");
    std::fs::write(&fake, b"not an ELF file").unwrap();
    let fake = fake.to_str().unwrap();
    for _ in 0..2 {
        let e = OrtBackend::new(Provider::Cpu)
            .load(&model, &with_library(fake))
            .err()
            .unwrap();
        assert!(matches!(e, BackendError::Load { .. }), "{e:?}");
        let e = e.to_string();
        eprintln!("{e}");
        assert!(
            e.contains("cannot load ONNX Runtime") && e.contains(fake),
            "{e}"
        );
        // The loader's reason, not just "dlopen failed".
        assert!(e.contains("ELF") || e.contains("too short"), "{e}");
    }

    // Another path after a failure: still an error, naming both.
    let missing = "/nonexistent/onnxruntime/libonnxruntime.so";
    let e = OrtBackend::new(Provider::Cuda)
        .load(&model, &with_library(missing))
        .err()
        .unwrap()
        .to_string();
    eprintln!("{e}");
    assert!(e.contains(fake) && e.contains(missing), "{e}");
}
