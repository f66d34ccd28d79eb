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

/// Gives every parameter an id derived from its path in the module tree.
///
/// burn keys optimizer state by parameter id, and fresh modules get random
/// ids; with path-derived ids a model rebuilt from a checkpoint matches the
/// optimizer state saved with it, so a resumed run continues exactly.
pub fn with_stable_param_ids(model: SegModel) -> SegModel {
    use burn::module::{ModuleMapper, Param, ParamId};

    struct Stable {
        path: Vec<String>,
    }
    impl ModuleMapper for Stable {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            // FNV-1a of the dotted path: stable across runs and platforms.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in self.path.join(".").bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            let (_, value, mapper) = param.consume();
            Param::from_mapped_value(ParamId::from(h), value, mapper)
        }
    }
    model.map(&mut Stable { path: Vec::new() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assemble::{BuildOptions, build};
    use crate::inflate::{DepthRule, Init};
    use crate::vit::{Vit2d, VitConfig};
    use burn::module::{ModuleVisitor, Param};

    struct Ids(Vec<u64>);
    impl ModuleVisitor for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.id.val());
        }
    }

    fn ids(m: &SegModel) -> Vec<u64> {
        let mut v = Ids(Vec::new());
        m.visit(&mut v);
        v.0
    }

    #[test]
    fn stable_ids_are_unique_and_reproducible() {
        let device = Device::default();
        let vit = Vit2d::random(
            VitConfig {
                patch: 4,
                width: 8,
                depth: 2,
                heads: 2,
                mlp: 16,
                in_chans: 3,
                grid: [2, 2],
                cls_token: true,
                layer_scale: true,
                eps: 1e-6,
            },
            1,
        );
        let opts = BuildOptions {
            shape: ModelShape::Slab { depth: 3 },
            roi_hw: [8, 8],
            in_channels: 1,
            classes: 2,
            features: 2,
            blocks: None,
            init: Init::Inflated(DepthRule::Centering),
        };
        let a = with_stable_param_ids(build(&vit, &opts, &device).unwrap());
        let b = with_stable_param_ids(build(&vit, &opts, &device).unwrap());
        let (ia, ib) = (ids(&a), ids(&b));
        assert_eq!(ia, ib);
        let mut u = ia.clone();
        u.sort_unstable();
        u.dedup();
        assert_eq!(u.len(), ia.len(), "ids must be unique");
    }
}
