//! The tract backend in process (no plugin boundary): the backend suite
//! (`infl8-backend-suite`: numbers, batching, thread counts, errors) and
//! what only tract does. The same model crosses the ABI in the workspace's
//! `tests/plugin_host.rs`.

use infl8_backend::Dim;
use infl8_backend_suite as suite;
use infl8_onnx::builder::{Dim as OnnxDim, GraphBuilder};
use infl8_onnx::examples::{conv3d_input as input, conv3d_reference as reference};
use infl8_tract::TractBackend;

use suite::threads_only as opts;

#[test]
fn runs_batches_with_any_thread_count() {
    suite::runs_batches_with_any_thread_count(&TractBackend::new(), &opts, &[1, 3]);
}

#[test]
fn a_fixed_batch_of_one_becomes_symbolic() {
    suite::a_fixed_batch_of_one_takes_any_batch(&TractBackend::new(), &opts);
}

#[test]
fn a_fixed_batch_above_one_runs_whole() {
    suite::a_fixed_batch_above_one_runs_whole(&TractBackend::new(), &opts);
}

#[test]
fn models_run_from_several_threads() {
    suite::models_run_from_several_threads(&TractBackend::new(), &opts);
}

#[test]
fn clear_errors() {
    suite::errors_are_clear(&TractBackend::new(), &opts);
}

#[test]
fn a_batch_of_one_hard_coded_in_a_reshape_still_splits() {
    // Conv then Reshape to [1, 128]: the shape constant only holds at batch 1.
    let dir = tempfile::tempdir().unwrap();
    let conv = suite::fixture(dir.path(), OnnxDim::Fixed(1));
    let mut model = infl8_onnx::read_model(&conv).unwrap();
    let graph = model.graph.as_mut().unwrap();
    let mut g = GraphBuilder::new("tail");
    let shape = g.weight_i64("flat_shape", &[2], &[1, 128]);
    g.node_named("Reshape", "flatten", &["logits", &shape], &["flat"], vec![]);
    g.output("flat", &[OnnxDim::Fixed(1), OnnxDim::Fixed(128)]);
    let tail = g.finish("infl8 tests").graph.unwrap();
    graph.node.extend(tail.node);
    graph.initializer.extend(tail.initializer);
    graph.output = tail.output;
    let path = dir.path().join("flat.onnx");
    infl8_onnx::write_model(&model, &path).unwrap();

    let model = infl8_backend::Backend::load(&TractBackend::new(), &path, &opts(1)).unwrap();
    assert!(matches!(model.input().shape[0], Dim::Symbolic(_)));
    assert!(matches!(model.output().shape[0], Dim::Symbolic(_)));
    assert_eq!(model.output().shape[1], Dim::Fixed(128));
    let out = model.run(&input(3), &[3, 1, 4, 4, 4]).unwrap();
    assert_eq!(out.shape(), &[3, 128]);
    suite::assert_close(out.data(), &reference(&input(3), 3));
}
