//! The tract backend in process (no plugin boundary): numbers, batching,
//! thread counts and errors. The same model crosses the ABI in the
//! workspace's `tests/plugin_host.rs`.

use std::path::{Path, PathBuf};

use infl8_backend::{Backend, BackendError, Dim, LoadOptions};
use infl8_onnx::builder::{Attr, Dim as OnnxDim, GraphBuilder};
use infl8_tract::TractBackend;

/// Conv3d weights `[2, 1, 3, 3, 3]`: channel 0 ramps (k + 1) / 27 over the
/// 27 taps in C order, channel 1 alternates ±0.25 like a checkerboard.
fn weight(o: usize, z: usize, y: usize, x: usize) -> f32 {
    if o == 0 {
        (z * 9 + y * 3 + x + 1) as f32 / 27.0
    } else if (z + y + x).is_multiple_of(2) {
        0.25
    } else {
        -0.25
    }
}

const BIAS: [f32; 2] = [0.5, -1.0];

/// `image [batch, 1, 4, 4, 4] -> Conv3d(3x3x3, pad 1) -> logits [batch, 2, 4, 4, 4]`,
/// written into `dir`.
fn conv3d_model(dir: &Path, batch: OnnxDim) -> PathBuf {
    let mut w = Vec::with_capacity(54);
    for o in 0..2 {
        for z in 0..3 {
            for y in 0..3 {
                for x in 0..3 {
                    w.push(weight(o, z, y, x));
                }
            }
        }
    }
    let mut g = GraphBuilder::new("conv3d_1to2");
    let image = g.input(
        "image",
        &[
            batch.clone(),
            OnnxDim::Fixed(1),
            OnnxDim::Fixed(4),
            OnnxDim::Fixed(4),
            OnnxDim::Fixed(4),
        ],
    );
    let wname = g.weight("W", &[2, 1, 3, 3, 3], &w);
    let bname = g.weight("B", &[2], &BIAS);
    g.node(
        "Conv",
        &[&image, &wname, &bname],
        vec![
            ("kernel_shape", Attr::Ints(vec![3, 3, 3])),
            ("pads", Attr::Ints(vec![1, 1, 1, 1, 1, 1])),
            ("strides", Attr::Ints(vec![1, 1, 1])),
        ],
    );
    g.rename_last_output("logits");
    g.output(
        "logits",
        &[
            batch,
            OnnxDim::Fixed(2),
            OnnxDim::Fixed(4),
            OnnxDim::Fixed(4),
            OnnxDim::Fixed(4),
        ],
    );
    let path = dir.join("conv3d.onnx");
    infl8_onnx::write_model(&g.finish("infl8 tests"), &path).expect("write model");
    path
}

/// Plain loops: out[b][o][z][y][x] = bias[o] + sum of w * in over the 3x3x3
/// neighbourhood, zero outside.
fn reference(input: &[f32], batch: usize) -> Vec<f32> {
    let at = |b: usize, z: isize, y: isize, x: isize| -> f32 {
        let inside = |v: isize| (0..4).contains(&v);
        if inside(z) && inside(y) && inside(x) {
            input[b * 64 + (z * 16 + y * 4 + x) as usize]
        } else {
            0.0
        }
    };
    let mut out = Vec::with_capacity(batch * 128);
    for b in 0..batch {
        for (o, bias) in BIAS.iter().enumerate() {
            for z in 0..4isize {
                for y in 0..4isize {
                    for x in 0..4isize {
                        let mut acc = *bias;
                        for kz in 0..3usize {
                            for ky in 0..3usize {
                                for kx in 0..3usize {
                                    let (dz, dy, dx) =
                                        (kz as isize - 1, ky as isize - 1, kx as isize - 1);
                                    acc += weight(o, kz, ky, kx) * at(b, z + dz, y + dy, x + dx);
                                }
                            }
                        }
                        out.push(acc);
                    }
                }
            }
        }
    }
    out
}

fn input(batch: usize) -> Vec<f32> {
    (0..batch * 64)
        .map(|i| ((i * 7) % 11) as f32 * 0.5 - 2.0)
        .collect()
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * w.abs().max(1.0),
            "value {i}: {g} != {w}"
        );
    }
}

#[test]
fn runs_batches_with_any_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = conv3d_model(dir.path(), OnnxDim::Symbolic("batch"));
    let backend = TractBackend::new();
    for threads in [1, 3] {
        let opts = LoadOptions {
            threads,
            ..Default::default()
        };
        let model = backend.load(&path, &opts).unwrap();
        assert_eq!(model.input().name, "image");
        assert_eq!(model.output().name, "logits");
        assert_eq!(model.input().shape[0], Dim::Symbolic("batch".into()));
        assert_eq!(model.input().shape[1..], [1, 4, 4, 4].map(Dim::Fixed));
        assert_eq!(model.output().shape[0], Dim::Symbolic("batch".into()));
        assert_eq!(model.output().shape[1..], [2, 4, 4, 4].map(Dim::Fixed));
        for batch in [1, 5] {
            let out = model.run(&input(batch), &[batch, 1, 4, 4, 4]).unwrap();
            assert_eq!(out.shape(), &[batch, 2, 4, 4, 4]);
            assert_close(out.data(), &reference(&input(batch), batch));
        }
        let empty = model.run(&[], &[0, 1, 4, 4, 4]).unwrap();
        assert_eq!(empty.shape(), &[0, 2, 4, 4, 4]);
    }
}

#[test]
fn a_fixed_batch_of_one_becomes_symbolic() {
    let dir = tempfile::tempdir().unwrap();
    let path = conv3d_model(dir.path(), OnnxDim::Fixed(1));
    let model = TractBackend::new()
        .load(&path, &LoadOptions::default())
        .unwrap();
    assert!(matches!(model.input().shape[0], Dim::Symbolic(_)));
    assert!(matches!(model.output().shape[0], Dim::Symbolic(_)));
    let out = model.run(&input(3), &[3, 1, 4, 4, 4]).unwrap();
    assert_close(out.data(), &reference(&input(3), 3));
}

#[test]
fn a_batch_of_one_hard_coded_in_a_reshape_still_splits() {
    // Conv then Reshape to [1, 128]: the shape constant only holds at batch 1.
    let dir = tempfile::tempdir().unwrap();
    let conv = conv3d_model(dir.path(), OnnxDim::Fixed(1));
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

    let model = TractBackend::new()
        .load(&path, &LoadOptions::default())
        .unwrap();
    assert!(matches!(model.input().shape[0], Dim::Symbolic(_)));
    assert!(matches!(model.output().shape[0], Dim::Symbolic(_)));
    assert_eq!(model.output().shape[1], Dim::Fixed(128));
    let out = model.run(&input(3), &[3, 1, 4, 4, 4]).unwrap();
    assert_eq!(out.shape(), &[3, 128]);
    assert_close(out.data(), &reference(&input(3), 3));
}

#[test]
fn a_fixed_batch_above_one_runs_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = conv3d_model(dir.path(), OnnxDim::Fixed(2));
    let model = TractBackend::new()
        .load(&path, &LoadOptions::default())
        .unwrap();
    assert_eq!(model.input().shape[0], Dim::Fixed(2));
    let out = model.run(&input(2), &[2, 1, 4, 4, 4]).unwrap();
    assert_close(out.data(), &reference(&input(2), 2));
    assert!(matches!(
        model.run(&input(3), &[3, 1, 4, 4, 4]),
        Err(BackendError::Shape { .. })
    ));
}

#[test]
fn clear_errors() {
    let backend = TractBackend::new();
    let e = backend
        .load(
            Path::new("/nonexistent/model.onnx"),
            &LoadOptions::default(),
        )
        .err()
        .unwrap();
    assert!(matches!(e, BackendError::Load { .. }), "{e:?}");
    assert!(e.to_string().contains("/nonexistent/model.onnx"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.onnx");
    std::fs::write(&corrupt, b"this is not protobuf \xff\xff\xff").unwrap();
    let e = backend
        .load(&corrupt, &LoadOptions::default())
        .err()
        .unwrap();
    assert!(matches!(e, BackendError::Load { .. }), "{e:?}");

    let path = conv3d_model(dir.path(), OnnxDim::Symbolic("batch"));
    let model = backend.load(&path, &LoadOptions::default()).unwrap();
    let e = model.run(&[0.0; 2 * 125], &[2, 1, 5, 5, 5]).unwrap_err();
    assert!(matches!(e, BackendError::Shape { .. }), "{e:?}");
    let e = model.run(&[0.0; 10], &[2, 1, 4, 4, 4]).unwrap_err();
    assert!(e.to_string().contains("input holds 10 values"), "{e}");
}
