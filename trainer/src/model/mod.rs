//! The segmentation model: inflated ViT encoder + UNETR-style decoder, in
//! the two shapes of the method (2.5D slab, 3D volumetric tiles).
//!
//! `forward` takes and returns the runtime's (infl8-core's) layouts, so the
//! trainer, the exported ONNX and `infl8 segment` agree without adapters:
//! - slab: in `[N, C, D, X, Y]`, out `[N, K, 1, X, Y]`;
//! - volumetric: in `[N, C, X, Y, Z]`, out `[N, K, X, Y, Z]`.
//!
//! Inside, the depth axis (slices, Z) comes first: `[N, C, D, H, W]`.

pub mod config;
pub mod decoder;
pub mod encoder;

use burn::module::Module;
use burn::tensor::{Device, Tensor};

pub use config::{ModelShape, SegConfig};
pub use decoder::{Decoder, DecoderSpec};
pub use encoder::Encoder;

use crate::inflate::Vit3dWeights;

#[derive(Module, Debug)]
pub struct SegModel {
    pub encoder: Encoder,
    pub decoder: Decoder,
    #[module(skip)]
    pub config: SegConfig,
}

fn decoder_spec(cfg: &SegConfig) -> DecoderSpec {
    let (input_channels, depth_kernel) = match cfg.shape {
        ModelShape::Slab { depth } => (cfg.in_channels() * depth, 1),
        ModelShape::Volumetric { .. } => (cfg.in_channels(), 3),
    };
    DecoderSpec {
        width: cfg.vit.width,
        features: cfg.features,
        classes: cfg.classes,
        input_channels,
        factors_hw: cfg.factors_hw.clone(),
        factors_d: cfg.factors_d.clone(),
        depth_kernel,
    }
}

impl SegModel {
    /// Encoder from (inflated) weights, decoder freshly initialised.
    pub fn from_encoder_weights(
        cfg: SegConfig,
        w: &Vit3dWeights,
        device: &Device,
    ) -> Result<SegModel, String> {
        cfg.validate()?;
        if w.config.width != cfg.vit.width
            || w.blocks.len() != cfg.vit.depth
            || w.patch_depth != cfg.shape.patch_depth()
            || w.depth_tokens != cfg.shape.depth_tokens()
            || w.config.grid != cfg.vit.grid
            || w.config.in_chans != cfg.vit.in_chans
        {
            return Err(format!(
                "encoder weights (width {}, {} blocks, patch depth {}, {} depth tokens, grid {:?}, \
                 {} channels) do not fit the model configuration",
                w.config.width,
                w.blocks.len(),
                w.patch_depth,
                w.depth_tokens,
                w.config.grid,
                w.config.in_chans
            ));
        }
        Ok(SegModel {
            encoder: Encoder::from_weights(w, device),
            decoder: Decoder::new(&decoder_spec(&cfg), device),
            config: cfg,
        })
    }

    /// Randomly initialised model (the `scratch` arm; also what checkpoint
    /// loading fills in).
    pub fn random(cfg: SegConfig, device: &Device) -> Result<SegModel, String> {
        cfg.validate()?;
        Ok(SegModel {
            encoder: Encoder::random(
                &cfg.vit,
                cfg.shape.patch_depth(),
                cfg.shape.depth_tokens(),
                device,
            ),
            decoder: Decoder::new(&decoder_spec(&cfg), device),
            config: cfg,
        })
    }

    /// Logits in the runtime's layout (see the module docs).
    pub fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        match self.config.shape {
            ModelShape::Slab { depth } => {
                let [n, c, d, h, w] = x.dims();
                let taps = self.encoder.forward(x.clone(), &self.config.taps).taps;
                // The slab's slices are channels of the input skip.
                let skip = x.reshape([n, c * d, 1, h, w]);
                debug_assert_eq!(d, depth);
                self.decoder.forward(taps, skip)
            }
            ModelShape::Volumetric { .. } => {
                // [N, C, X, Y, Z] -> [N, C, Z, X, Y] and back.
                let x = x.permute([0, 1, 4, 2, 3]);
                let taps = self.encoder.forward(x.clone(), &self.config.taps).taps;
                self.decoder.forward(taps, x).permute([0, 1, 3, 4, 2])
            }
        }
    }
}
