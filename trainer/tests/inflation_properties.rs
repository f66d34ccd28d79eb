//! TransSeg's inflation properties, checked on the burn model: inflated
//! encoders reproduce the 2D ViT's tokens on the inputs where they should.

use burn::tensor::{Device, Tensor, TensorData};
use infl8_trainer::assemble::{BuildOptions, build};
use infl8_trainer::inflate::{DepthRule, InflateSpec, Init, Vit3dWeights, inflate};
use infl8_trainer::model::{Encoder, ModelShape};
use infl8_trainer::vit::{Vit2d, VitConfig};

fn config() -> VitConfig {
    VitConfig {
        patch: 4,
        width: 32,
        depth: 2,
        heads: 4,
        mlp: 64,
        in_chans: 3,
        grid: [3, 3],
        cls_token: true,
        layer_scale: true,
        eps: 1e-6,
    }
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// A deterministic 12x12 image.
fn image(seed: f32) -> Vec<f32> {
    (0..144)
        .map(|i| (i as f32 * 0.37 + seed).sin() * 1.5 + (i / 12) as f32 * 0.05)
        .collect()
}

/// The 2D ViT's tokens for a grey image (the same image on R, G and B).
fn tokens_2d(v: &Vit2d, img: &[f32], device: &Device) -> Vec<f32> {
    let enc = Encoder::from_weights(&Vit3dWeights::exact_2d(v), device);
    let mut rgb = img.to_vec();
    rgb.extend_from_slice(img);
    rgb.extend_from_slice(img);
    let x = Tensor::<5>::from_data(TensorData::new(rgb, [1, 3, 1, 12, 12]), device);
    values(enc.tokens(x))
}

fn inflated(v: &Vit2d, rule: DepthRule, cin: usize, dp: usize, device: &Device) -> Encoder {
    let spec = InflateSpec {
        in_channels: cin,
        patch_depth: dp,
        depth_tokens: 1,
        grid: [3, 3],
        blocks: None,
        rule,
    };
    Encoder::from_weights(&inflate(v, &spec).unwrap(), device)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn centering_on_a_slab_gives_the_2d_tokens_of_its_middle_slice() {
    let device = Device::default();
    let v = Vit2d::random(config(), 1);
    let mid = image(0.0);
    let want = tokens_2d(&v, &mid, &device);
    for dp in [3, 4, 5] {
        // Other slices hold unrelated content: centering must ignore them.
        let mut slab = Vec::new();
        for d in 0..dp {
            if d == dp / 2 {
                slab.extend_from_slice(&mid);
            } else {
                slab.extend(image(10.0 + d as f32));
            }
        }
        let enc = inflated(&v, DepthRule::Centering, 1, dp, &device);
        let x = Tensor::<5>::from_data(TensorData::new(slab, [1, 1, dp, 12, 12]), &device);
        let got = values(enc.tokens(x));
        let d = max_diff(&got, &want);
        assert!(d <= 1e-5, "depth {dp}: max diff {d}");
    }
}

#[test]
fn average_on_identical_slices_gives_the_2d_tokens() {
    let device = Device::default();
    let v = Vit2d::random(config(), 2);
    let img = image(0.5);
    let want = tokens_2d(&v, &img, &device);
    let dp = 4;
    let slab: Vec<f32> = (0..dp).flat_map(|_| img.clone()).collect();
    let enc = inflated(&v, DepthRule::Average, 1, dp, &device);
    let x = Tensor::<5>::from_data(TensorData::new(slab, [1, 1, dp, 12, 12]), &device);
    let d = max_diff(&values(enc.tokens(x)), &want);
    assert!(d <= 1e-5, "max diff {d}");
    // And the property is not vacuous: different slices change the result.
    let mut other: Vec<f32> = (0..dp).flat_map(|_| img.clone()).collect();
    other[..144].copy_from_slice(&image(7.0));
    let x = Tensor::<5>::from_data(TensorData::new(other, [1, 1, dp, 12, 12]), &device);
    assert!(max_diff(&values(enc.tokens(x)), &want) > 1e-3);
}

#[test]
fn identical_input_channels_equal_the_single_channel_result() {
    let device = Device::default();
    let v = Vit2d::random(config(), 3);
    let dp = 3;
    let slab: Vec<f32> = (0..dp).flat_map(|d| image(d as f32)).collect();
    for rule in [DepthRule::Centering, DepthRule::Average] {
        let one = inflated(&v, rule, 1, dp, &device);
        let x1 = Tensor::<5>::from_data(TensorData::new(slab.clone(), [1, 1, dp, 12, 12]), &device);
        let want = values(one.tokens(x1));
        for cin in [2, 3] {
            let many = inflated(&v, rule, cin, dp, &device);
            let data: Vec<f32> = (0..cin).flat_map(|_| slab.clone()).collect();
            let x = Tensor::<5>::from_data(TensorData::new(data, [1, cin, dp, 12, 12]), &device);
            let d = max_diff(&values(many.tokens(x)), &want);
            assert!(d <= 1e-5, "{rule:?}, {cin} channels: max diff {d}");
        }
    }
}

#[test]
fn every_init_builds_both_shapes() {
    let device = Device::default();
    let v = Vit2d::random(config(), 4);
    for init in [
        Init::Inflated(DepthRule::Centering),
        Init::Inflated(DepthRule::Average),
        Init::Scratch,
        Init::TwoD,
    ] {
        for shape in [
            ModelShape::Slab { depth: 3 },
            ModelShape::Volumetric {
                tile_depth: 8,
                patch_depth: 4,
            },
        ] {
            let opts = BuildOptions {
                shape: shape.clone(),
                roi_hw: [8, 12],
                in_channels: 1,
                classes: 2,
                features: 4,
                blocks: Some(1),
                init,
            };
            let model = match build(&v, &opts, &device) {
                Ok(m) => m,
                Err(e) => {
                    assert!(
                        init == Init::TwoD && matches!(shape, ModelShape::Volumetric { .. }),
                        "{init:?} {shape:?}: {e}"
                    );
                    continue;
                }
            };
            let mut in_shape = vec![2];
            in_shape.extend(model.config.input_item_shape());
            let n: usize = in_shape.iter().product();
            let x = Tensor::<5>::from_data(
                TensorData::new(vec![0.1f32; n], <[usize; 5]>::try_from(in_shape).unwrap()),
                &device,
            );
            let y = model.forward(x);
            let mut want = vec![2];
            want.extend(model.config.output_item_shape());
            assert_eq!(y.dims().to_vec(), want, "{init:?} {shape:?}");
        }
    }
}
