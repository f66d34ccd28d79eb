//! One training step (forward, cross-entropy, backward) of a slab model
//! the size of the default edge model (ViT-S width, 4 blocks, 112x112
//! slabs of 3 slices, batch 2) on each compiled-in CPU backend: the numbers
//! behind the choice of burn's default device (docs/trainer.md).
//!
//!   cargo bench -p infl8-trainer --bench train_step [--features ndarray-backend]

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Distribution, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use infl8_trainer::assemble::{BuildOptions, build};
use infl8_trainer::inflate::{DepthRule, Init};
use infl8_trainer::model::ModelShape;
use infl8_trainer::vit::{Vit2d, VitConfig};

fn step(c: &mut Criterion) {
    let vit = Vit2d::random(
        VitConfig {
            patch: 14,
            width: 384,
            depth: 4,
            heads: 6,
            mlp: 1536,
            in_chans: 3,
            grid: [8, 8],
            cls_token: true,
            layer_scale: true,
            eps: 1e-6,
        },
        1,
    );
    #[allow(unused_mut)]
    let mut devices: Vec<(&str, Device)> = vec![("flex", Device::flex())];
    #[cfg(feature = "ndarray-backend")]
    #[allow(deprecated)]
    devices.push(("ndarray", Device::ndarray()));
    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);
    for (name, base) in devices {
        let device = base.autodiff();
        let opts = BuildOptions {
            shape: ModelShape::Slab { depth: 3 },
            roi_hw: [112, 112],
            in_channels: 1,
            classes: 2,
            features: 16,
            blocks: None,
            init: Init::Inflated(DepthRule::Centering),
        };
        let model = build(&vit, &opts, &device).expect("model");
        let x = Tensor::<5>::random([2, 1, 3, 112, 112], Distribution::Normal(0.0, 1.0), &device);
        let target = Tensor::<5>::random(
            [2, 2, 1, 112, 112],
            Distribution::Uniform(0.0, 1.0),
            &device,
        );
        group.bench_function(name, |b| {
            b.iter(|| {
                let logits = model.forward(x.clone());
                let loss = (log_softmax(logits, 1) * target.clone()).mean().neg();
                let grads = loss.backward();
                std::hint::black_box(grads);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, step);
criterion_main!(benches);
