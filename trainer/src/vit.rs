//! Framework-free weights of a plain ViT (timm `VisionTransformer`, HF
//! `ViTModel`/`Dinov2Model`): what every importer produces and what
//! inflation and the burn model consume. Linear weights keep PyTorch's
//! `[out, in]` layout so that importers copy rather than transpose.

use ndarray::{Array1, Array2, Array4};
use serde::{Deserialize, Serialize};

/// Architecture of a ViT, read off its weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    /// In-plane patch size P (14 for DINOv2, 16 for most timm/BEiT models).
    pub patch: usize,
    /// Token width C.
    pub width: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    pub heads: usize,
    /// Hidden width of the MLP.
    pub mlp: usize,
    /// Input channels of the patch embedding (3 for RGB models).
    pub in_chans: usize,
    /// Position-embedding grid (rows, cols) of the patch tokens.
    pub grid: [usize; 2],
    /// Whether a cls token leads the sequence (and the position table).
    pub cls_token: bool,
    /// Whether the blocks carry layer-scale vectors (DINOv2, CaiT).
    pub layer_scale: bool,
    /// LayerNorm epsilon (1e-6 for timm and DINOv2, 1e-12 for HF ViT).
    pub eps: f64,
}

impl VitConfig {
    pub fn head_dim(&self) -> usize {
        self.width / self.heads
    }
}

/// One pre-norm transformer block.
#[derive(Clone, Debug)]
pub struct BlockWeights {
    pub norm1_w: Array1<f32>,
    pub norm1_b: Array1<f32>,
    /// Fused q, k, v projection, `[3C, C]`, rows in q, k, v order.
    pub qkv_w: Array2<f32>,
    /// `[3C]`; zeros for models without a qkv bias.
    pub qkv_b: Array1<f32>,
    /// Attention output projection `[C, C]`.
    pub proj_w: Array2<f32>,
    pub proj_b: Array1<f32>,
    /// Layer-scale after attention, `[C]`.
    pub ls1: Option<Array1<f32>>,
    pub norm2_w: Array1<f32>,
    pub norm2_b: Array1<f32>,
    /// `[M, C]`.
    pub fc1_w: Array2<f32>,
    pub fc1_b: Array1<f32>,
    /// `[C, M]`.
    pub fc2_w: Array2<f32>,
    pub fc2_b: Array1<f32>,
    /// Layer-scale after the MLP, `[C]`.
    pub ls2: Option<Array1<f32>>,
}

/// A 2D ViT backbone: patch embedding, cls token, absolute position
/// embeddings, blocks, final norm. Heads (classifier, saliency, ...) are not
/// part of it.
#[derive(Clone, Debug)]
pub struct Vit2d {
    pub config: VitConfig,
    /// `[C, in_chans, P, P]`.
    pub patch_w: Array4<f32>,
    /// `[C]`.
    pub patch_b: Array1<f32>,
    /// `[C]` when `config.cls_token`.
    pub cls: Option<Array1<f32>>,
    /// `[cls + rows*cols, C]`, cls entry first when present, then the grid
    /// in row-major order.
    pub pos: Array2<f32>,
    pub blocks: Vec<BlockWeights>,
    pub norm_w: Array1<f32>,
    pub norm_b: Array1<f32>,
}

impl Vit2d {
    /// A ViT with deterministic pseudo-random weights (`seed`), for tests and
    /// examples that need a real, non-trivial network without a download.
    pub fn random(config: VitConfig, seed: u64) -> Vit2d {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move |scale: f32| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Uniform in [-scale, scale).
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        };
        let c = config.width;
        let m = config.mlp;
        let p = config.patch;
        let mut v1 = |n: usize, s: f32| Array1::from_shape_simple_fn(n, || next(s));
        let b = |v1: &mut dyn FnMut(usize, f32) -> Array1<f32>, r: usize, k: usize, s: f32| {
            Array2::from_shape_vec((r, k), v1(r * k, s).to_vec())
                .unwrap_or_else(|_| Array2::zeros((r, k)))
        };
        let tokens = usize::from(config.cls_token) + config.grid[0] * config.grid[1];
        let blocks = (0..config.depth)
            .map(|_| BlockWeights {
                norm1_w: v1(c, 0.2).mapv(|x| 1.0 + x),
                norm1_b: v1(c, 0.1),
                qkv_w: b(&mut v1, 3 * c, c, 0.3),
                qkv_b: v1(3 * c, 0.1),
                proj_w: b(&mut v1, c, c, 0.3),
                proj_b: v1(c, 0.1),
                ls1: config.layer_scale.then(|| v1(c, 0.5)),
                norm2_w: v1(c, 0.2).mapv(|x| 1.0 + x),
                norm2_b: v1(c, 0.1),
                fc1_w: b(&mut v1, m, c, 0.3),
                fc1_b: v1(m, 0.1),
                fc2_w: b(&mut v1, c, m, 0.3),
                fc2_b: v1(c, 0.1),
                ls2: config.layer_scale.then(|| v1(c, 0.5)),
            })
            .collect();
        let patch_w = Array4::from_shape_vec(
            (c, config.in_chans, p, p),
            v1(c * config.in_chans * p * p, 0.3).to_vec(),
        )
        .unwrap_or_else(|_| Array4::zeros((c, config.in_chans, p, p)));
        Vit2d {
            patch_w,
            patch_b: v1(c, 0.1),
            cls: config.cls_token.then(|| v1(c, 0.5)),
            pos: b(&mut v1, tokens, c, 0.5),
            blocks,
            norm_w: v1(c, 0.2).mapv(|x| 1.0 + x),
            norm_b: v1(c, 0.1),
            config,
        }
    }
}
