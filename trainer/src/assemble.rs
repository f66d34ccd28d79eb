//! From a pretrained 2D ViT to a segmentation model, for each ablation arm.

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::inflate::{DepthRule, InflateSpec, Init, Vit3dWeights, inflate};
use crate::model::{ModelShape, SegConfig, SegModel};
use crate::vit::Vit2d;

/// What the user asks for; the rest is derived.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BuildOptions {
    pub shape: ModelShape,
    /// In-plane tile (X, Y); multiples of the patch size.
    pub roi_hw: [usize; 2],
    pub in_channels: usize,
    pub classes: usize,
    /// Decoder width at full resolution.
    pub features: usize,
    /// Keep the first K encoder blocks (None: all).
    pub blocks: Option<usize>,
    pub init: Init,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("model: {0}")]
    Invalid(String),
    #[error(transparent)]
    Inflate(#[from] crate::inflate::InflateError),
}

/// Builds the model: encoder from `vit` by `opts.init`, decoder fresh.
pub fn build(vit: &Vit2d, opts: &BuildOptions, device: &Device) -> Result<SegModel, BuildError> {
    let p = vit.config.patch;
    if opts.roi_hw.iter().any(|&r| r == 0 || r % p != 0) {
        return Err(BuildError::Invalid(format!(
            "the in-plane tile {:?} must be a positive multiple of the patch size {p}",
            opts.roi_hw
        )));
    }
    let shape = match (opts.init, &opts.shape) {
        // Slice-wise 2D: one slice in, one out.
        (Init::TwoD, ModelShape::Slab { .. }) => ModelShape::Slab { depth: 1 },
        (Init::TwoD, ModelShape::Volumetric { .. }) => {
            return Err(BuildError::Invalid(
                "--init 2d applies the 2D model slice by slice: use the slab shape".into(),
            ));
        }
        (_, s) => s.clone(),
    };
    let grid = [opts.roi_hw[0] / p, opts.roi_hw[1] / p];
    let rule = match opts.init {
        Init::Inflated(rule) => rule,
        _ => DepthRule::Centering,
    };
    let spec = InflateSpec {
        in_channels: opts.in_channels,
        patch_depth: shape.patch_depth(),
        depth_tokens: shape.depth_tokens(),
        grid,
        blocks: opts.blocks,
        rule,
    };
    let weights: Vit3dWeights = inflate(vit, &spec)?;
    let cfg = SegConfig::derive(
        weights.config.clone(),
        shape,
        opts.classes,
        opts.features,
        opts.init,
        String::new(),
    )
    .map_err(BuildError::Invalid)?;
    let model = match opts.init {
        Init::Scratch => SegModel::random(cfg, device),
        _ => SegModel::from_encoder_weights(cfg, &weights, device),
    };
    model.map_err(BuildError::Invalid)
}
