//! Cost of the runtime's own share of inference: cutting windows, batching,
//! Gaussian blending and the argmax. The model is trivial and in-process, so
//! what is measured is infl8, not a backend.
//!
//! `cargo bench -p infl8-suite --bench sliding_window`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use infl8_core::backend::{BackendError, Dim, Model, Tensor, TensorInfo};
use infl8_core::inference::{
    Accumulator, BlendMode, SlidingWindow, argmax, importance_map, window_starts,
};
use ndarray::{Array, Array4};

const SIZE: usize = 128;
const ROI: usize = 64;

/// `[B, 1, x, y, z] -> [B, 2, x, y, z]`: the window and its negation, about
/// the cheapest model with two classes.
struct Trivial {
    input: TensorInfo,
    output: TensorInfo,
}

impl Trivial {
    fn new() -> Self {
        let shape = |c| {
            vec![
                Dim::Symbolic("N".into()),
                Dim::Fixed(c),
                Dim::Symbolic("X".into()),
                Dim::Symbolic("Y".into()),
                Dim::Symbolic("Z".into()),
            ]
        };
        Trivial {
            input: TensorInfo {
                name: "image".into(),
                shape: shape(1),
            },
            output: TensorInfo {
                name: "scores".into(),
                shape: shape(2),
            },
        }
    }
}

impl Model for Trivial {
    fn input(&self) -> &TensorInfo {
        &self.input
    }

    fn output(&self) -> &TensorInfo {
        &self.output
    }

    fn run(&self, data: &[f32], shape: &[usize]) -> Result<Tensor, BackendError> {
        let n: usize = shape[2..].iter().product();
        let mut out = Vec::with_capacity(2 * data.len());
        for x in data.chunks_exact(n) {
            out.extend_from_slice(x);
            out.extend(x.iter().map(|v| -v));
        }
        let mut s = shape.to_vec();
        s[1] = 2;
        Tensor::from_vec(s, out)
    }
}

fn image() -> Array4<f32> {
    Array::from_shape_fn((1, SIZE, SIZE, SIZE), |(_, x, y, z)| {
        ((x ^ y ^ z) & 15) as f32 - 7.5
    })
}

fn sliding_window(c: &mut Criterion) {
    let image = image();
    let model = Trivial::new();
    let mut group = c.benchmark_group("sliding_window");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));

    for mode in [BlendMode::Gaussian, BlendMode::Constant] {
        let sw = SlidingWindow {
            roi: [ROI; 3],
            overlap: 0.5,
            mode,
            batch_size: 4,
            ..SlidingWindow::default()
        };
        group.bench_function(
            format!("run_{SIZE}cube_roi{ROI}_overlap0.5_2classes_{mode:?}"),
            |b| {
                b.iter(|| {
                    sw.run(black_box(image.view()), &model, &|_, _| {})
                        .expect("the bench model fits the settings")
                })
            },
        );
    }

    // The blending alone: 27 windows of 2 x 64^3 predictions into 2 x 128^3.
    let roi = [ROI; 3];
    let importance = importance_map(roi, BlendMode::Gaussian, 0.125);
    let importance: Vec<f32> = importance.iter().copied().collect();
    let pred: Vec<f32> = (0..2 * ROI * ROI * ROI).map(|i| (i % 97) as f32).collect();
    let origins: Vec<[isize; 3]> = window_starts([SIZE; 3], roi, 0.5)
        .expect("valid overlap")
        .into_iter()
        .map(|s| s.map(|v| v as isize))
        .collect();
    group.bench_function(format!("accumulate_{}_windows", origins.len()), |b| {
        b.iter(|| {
            let mut acc = Accumulator::new(2, [SIZE; 3]);
            for &origin in &origins {
                acc.add(origin, roi, black_box(&pred), &importance)
                    .expect("window sizes agree");
            }
            acc.into_output().expect("shape agrees")
        })
    });
    group.finish();
}

fn argmax_bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("argmax");
    group.sample_size(20);
    for classes in [2, 14] {
        let logits = Array::from_shape_fn((classes, SIZE, SIZE, SIZE), |(k, x, y, z)| {
            ((x * 7 + y * 13 + z * 3 + k * 5) % 31) as f32
        });
        group.bench_function(format!("{classes}x{SIZE}cube"), |b| {
            b.iter(|| argmax(black_box(logits.view())).expect("finite logits"))
        });
    }
    group.finish();
}

criterion_group!(benches, sliding_window, argmax_bench);
criterion_main!(benches);
