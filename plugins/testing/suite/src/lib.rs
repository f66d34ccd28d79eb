//! One test suite for every backend, run in process (no plugin boundary)
//! by each backend's own tests: the numbers of a Conv3d fixture against its
//! plain-loop reference (`infl8_onnx::examples::conv3d_*`), batches of any
//! size at several thread counts, a fixed batch of one or above, concurrent
//! callers, and clean errors. A backend calls each check from a `#[test]`
//! with a function that makes its load options for a thread count.

use std::path::{Path, PathBuf};

use infl8_backend::{Backend, BackendError, Dim, LoadOptions};
use infl8_onnx::builder::Dim as OnnxDim;
use infl8_onnx::examples::{conv3d_input as input, conv3d_model, conv3d_reference as reference};

/// The backend's load options for a thread count.
pub type Options<'a> = &'a dyn Fn(usize) -> LoadOptions;

/// Load options with only a thread count: what a backend without options
/// of its own passes as [`Options`].
pub fn threads_only(threads: usize) -> LoadOptions {
    LoadOptions {
        threads,
        ..Default::default()
    }
}

/// Writes the Conv3d fixture with `batch` as its batch dimension into `dir`.
pub fn fixture(dir: &Path, batch: OnnxDim) -> PathBuf {
    let path = dir.join("conv3d.onnx");
    infl8_onnx::write_model(&conv3d_model(batch), &path).expect("write the fixture model");
    path
}

/// Equal within 1e-4, relative above 1.
pub fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * w.abs().max(1.0),
            "value {i}: {g} != {w}"
        );
    }
}

/// A symbolic batch: every batch size (0 too) at each thread count, with
/// the declared shapes kept.
pub fn runs_batches_with_any_thread_count(backend: &dyn Backend, opts: Options, threads: &[usize]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = fixture(dir.path(), OnnxDim::Symbolic("batch"));
    for &t in threads {
        let model = backend.load(&path, &opts(t)).expect("load");
        assert_eq!(model.input().name, "image");
        assert_eq!(model.output().name, "logits");
        // Any batch: a symbolic first dim (its name is the backend's own).
        assert!(matches!(model.input().shape[0], Dim::Symbolic(_)));
        assert_eq!(model.input().shape[1..], [1, 4, 4, 4].map(Dim::Fixed));
        assert!(matches!(model.output().shape[0], Dim::Symbolic(_)));
        assert_eq!(model.output().shape[1..], [2, 4, 4, 4].map(Dim::Fixed));
        for batch in [1, 5] {
            let out = model.run(&input(batch), &[batch, 1, 4, 4, 4]).expect("run");
            assert_eq!(out.shape(), &[batch, 2, 4, 4, 4]);
            assert_close(out.data(), &reference(&input(batch), batch));
        }
        let empty = model
            .run(&[], &[0, 1, 4, 4, 4])
            .expect("run an empty batch");
        assert_eq!(empty.shape(), &[0, 2, 4, 4, 4]);
    }
}

/// A model exported with a batch of one takes any batch (item by item).
pub fn a_fixed_batch_of_one_takes_any_batch(backend: &dyn Backend, opts: Options) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = fixture(dir.path(), OnnxDim::Fixed(1));
    let model = backend.load(&path, &opts(1)).expect("load");
    assert!(matches!(model.input().shape[0], Dim::Symbolic(_)));
    assert!(matches!(model.output().shape[0], Dim::Symbolic(_)));
    let out = model.run(&input(3), &[3, 1, 4, 4, 4]).expect("run");
    assert_eq!(out.shape(), &[3, 2, 4, 4, 4]);
    assert_close(out.data(), &reference(&input(3), 3));
}

/// A fixed batch above one runs whole, and refuses another size.
pub fn a_fixed_batch_above_one_runs_whole(backend: &dyn Backend, opts: Options) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = fixture(dir.path(), OnnxDim::Fixed(2));
    let model = backend.load(&path, &opts(1)).expect("load");
    assert_eq!(model.input().shape[0], Dim::Fixed(2));
    let out = model.run(&input(2), &[2, 1, 4, 4, 4]).expect("run");
    assert_close(out.data(), &reference(&input(2), 2));
    assert!(matches!(
        model.run(&input(3), &[3, 1, 4, 4, 4]),
        Err(BackendError::Shape { .. })
    ));
}

/// One model run from several threads at once gives each its own answer.
pub fn models_run_from_several_threads(backend: &dyn Backend, opts: Options) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = fixture(dir.path(), OnnxDim::Symbolic("batch"));
    let model = backend.load(&path, &opts(1)).expect("load");
    std::thread::scope(|s| {
        for t in 0..3 {
            let model = &model;
            s.spawn(move || {
                for i in 0..10 {
                    let batch = 1 + (t + i) % 3;
                    let out = model.run(&input(batch), &[batch, 1, 4, 4, 4]).expect("run");
                    assert_close(out.data(), &reference(&input(batch), batch));
                }
            });
        }
    });
}

/// A missing or corrupt model file is a load error naming the file; an
/// input of the wrong shape or length is refused.
pub fn errors_are_clear(backend: &dyn Backend, opts: Options) {
    let e = backend
        .load(Path::new("/nonexistent/model.onnx"), &opts(1))
        .err()
        .expect("a missing file fails");
    assert!(matches!(e, BackendError::Load { .. }), "{e:?}");
    assert!(e.to_string().contains("/nonexistent/model.onnx"), "{e}");

    let dir = tempfile::tempdir().expect("temp dir");
    let corrupt = dir.path().join("corrupt.onnx");
    std::fs::write(&corrupt, b"this is not protobuf \xff\xff\xff").expect("write");
    let e = backend
        .load(&corrupt, &opts(1))
        .err()
        .expect("a corrupt file fails");
    assert!(matches!(e, BackendError::Load { .. }), "{e:?}");

    let path = fixture(dir.path(), OnnxDim::Symbolic("batch"));
    let model = backend.load(&path, &opts(1)).expect("load");
    let e = model.run(&[0.0; 2 * 125], &[2, 1, 5, 5, 5]).unwrap_err();
    assert!(matches!(e, BackendError::Shape { .. }), "{e:?}");
    let e = model.run(&[0.0; 10], &[2, 1, 4, 4, 4]).unwrap_err();
    assert!(e.to_string().contains("input holds 10 values"), "{e}");
}
