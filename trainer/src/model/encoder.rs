//! The ViT encoder on 3D input: a Conv3d patch embedding (kernel
//! `[Dp, P, P]`, stride = kernel), cls token, absolute position embeddings,
//! pre-norm blocks with optional layer-scale, final LayerNorm.
//!
//! Linear weights are kept in burn's `[in, out]` layout; the loaders
//! transpose PyTorch's `[out, in]` once.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv3d, Conv3dConfig};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig, PaddingConfig3d};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use ndarray::{Array, Dimension};

use crate::inflate::Vit3dWeights;
use crate::vit::{BlockWeights, VitConfig};

/// An ndarray as a burn tensor of the same shape.
pub(crate) fn tensor<const D: usize, Dm: Dimension>(
    a: &Array<f32, Dm>,
    device: &Device,
) -> Tensor<D> {
    let shape = a.shape().to_vec();
    let data: Vec<f32> = a.iter().copied().collect();
    Tensor::from_data(TensorData::new(data, shape), device)
}

fn linear_from(
    w_out_in: &ndarray::Array2<f32>,
    b: &ndarray::Array1<f32>,
    device: &Device,
) -> Linear {
    Linear {
        weight: Param::from_tensor(tensor(&w_out_in.t().to_owned(), device)),
        bias: Some(Param::from_tensor(tensor(b, device))),
    }
}

fn layer_norm_from(
    w: &ndarray::Array1<f32>,
    b: &ndarray::Array1<f32>,
    eps: f64,
    device: &Device,
) -> LayerNorm {
    let mut ln = LayerNormConfig::new(w.len()).with_epsilon(eps).init(device);
    ln.gamma = Param::from_tensor(tensor(w, device));
    ln.beta = Some(Param::from_tensor(tensor(b, device)));
    ln
}

#[derive(Module, Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    /// Fused q, k, v: `[C, 3C]`.
    pub qkv: Linear,
    pub proj: Linear,
    pub ls1: Option<Param<Tensor<1>>>,
    pub norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub ls2: Option<Param<Tensor<1>>>,
    pub heads: usize,
}

impl Block {
    fn from_weights(b: &BlockWeights, cfg: &VitConfig, device: &Device) -> Block {
        let ls = |v: &Option<ndarray::Array1<f32>>| {
            v.as_ref().map(|v| Param::from_tensor(tensor(v, device)))
        };
        Block {
            norm1: layer_norm_from(&b.norm1_w, &b.norm1_b, cfg.eps, device),
            qkv: linear_from(&b.qkv_w, &b.qkv_b, device),
            proj: linear_from(&b.proj_w, &b.proj_b, device),
            ls1: ls(&b.ls1),
            norm2: layer_norm_from(&b.norm2_w, &b.norm2_b, cfg.eps, device),
            fc1: linear_from(&b.fc1_w, &b.fc1_b, device),
            fc2: linear_from(&b.fc2_w, &b.fc2_b, device),
            ls2: ls(&b.ls2),
            heads: cfg.heads,
        }
    }

    /// Random init as timm's ViT: truncated-normal-like small linears, zero
    /// biases, layer-scale 1e-5 where the architecture has it.
    fn random(cfg: &VitConfig, device: &Device) -> Block {
        let c = cfg.width;
        let lin = |i: usize, o: usize| {
            LinearConfig::new(i, o)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                })
                .init(device)
        };
        let zero_bias = |mut l: Linear| {
            let o = l.weight.dims()[1];
            l.bias = Some(Param::from_tensor(Tensor::zeros([o], device)));
            l
        };
        let ls = || {
            cfg.layer_scale
                .then(|| Param::from_tensor(Tensor::full([c], 1e-5, device)))
        };
        Block {
            norm1: LayerNormConfig::new(c).with_epsilon(cfg.eps).init(device),
            qkv: zero_bias(lin(c, 3 * c)),
            proj: zero_bias(lin(c, c)),
            ls1: ls(),
            norm2: LayerNormConfig::new(c).with_epsilon(cfg.eps).init(device),
            fc1: zero_bias(lin(c, cfg.mlp)),
            fc2: zero_bias(lin(cfg.mlp, c)),
            ls2: ls(),
            heads: cfg.heads,
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [n, t, c] = x.dims();
        let h = self.heads;
        let hd = c / h;
        let qkv = self
            .qkv
            .forward(self.norm1.forward(x.clone()))
            .reshape([n, t, 3, h, hd])
            .permute([2, 0, 3, 1, 4]);
        let q = qkv.clone().narrow(0, 0, 1).reshape([n, h, t, hd]);
        let k = qkv.clone().narrow(0, 1, 1).reshape([n, h, t, hd]);
        let v = qkv.narrow(0, 2, 1).reshape([n, h, t, hd]);
        let scale = (hd as f64).powf(-0.5);
        let attn = softmax(q.matmul(k.swap_dims(2, 3)) * scale, 3);
        let a = attn.matmul(v).swap_dims(1, 2).reshape([n, t, c]);
        let mut a = self.proj.forward(a);
        if let Some(g) = &self.ls1 {
            a = a * g.val().reshape([1, 1, c]);
        }
        let x = x + a;
        let mut m = self
            .fc2
            .forward(gelu(self.fc1.forward(self.norm2.forward(x.clone()))));
        if let Some(g) = &self.ls2 {
            m = m * g.val().reshape([1, 1, c]);
        }
        x + m
    }
}

#[derive(Module, Debug)]
pub struct Encoder {
    pub patch: Conv3d,
    /// `[1, 1, C]`.
    pub cls: Option<Param<Tensor<3>>>,
    /// `[1, cls + T, C]`.
    pub pos: Param<Tensor<3>>,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    /// Token grid (depth, rows, cols).
    pub grid: [usize; 3],
    pub width: usize,
}

/// Feature maps of the tapped blocks, `[N, C, Td, Gh, Gw]` each, shallow to
/// deep; the deepest is taken after the final norm.
pub struct EncoderOut {
    pub taps: Vec<Tensor<5>>,
}

impl Encoder {
    fn patch_conv(cfg: &VitConfig, patch_depth: usize, device: &Device) -> Conv3d {
        let p = cfg.patch;
        Conv3dConfig::new([cfg.in_chans, cfg.width], [patch_depth, p, p])
            .with_stride([patch_depth, p, p])
            .with_padding(PaddingConfig3d::Valid)
            .init(device)
    }

    pub fn from_weights(w: &Vit3dWeights, device: &Device) -> Encoder {
        let cfg = &w.config;
        let c = cfg.width;
        let mut patch = Self::patch_conv(cfg, w.patch_depth, device);
        patch.weight = Param::from_tensor(tensor(&w.patch_w, device));
        patch.bias = Some(Param::from_tensor(tensor(&w.patch_b, device)));
        let tokens = w.pos.nrows();
        Encoder {
            patch,
            cls: w
                .cls
                .as_ref()
                .map(|c0| Param::from_tensor(tensor::<1, _>(c0, device).reshape([1, 1, c]))),
            pos: Param::from_tensor(tensor::<2, _>(&w.pos, device).reshape([1, tokens, c])),
            blocks: w
                .blocks
                .iter()
                .map(|b| Block::from_weights(b, cfg, device))
                .collect(),
            norm: layer_norm_from(&w.norm_w, &w.norm_b, cfg.eps, device),
            grid: [w.depth_tokens, cfg.grid[0], cfg.grid[1]],
            width: c,
        }
    }

    /// Same architecture, random weights (the `scratch` ablation).
    pub fn random(
        cfg: &VitConfig,
        patch_depth: usize,
        depth_tokens: usize,
        device: &Device,
    ) -> Encoder {
        let c = cfg.width;
        let n_cls = usize::from(cfg.cls_token);
        let tokens = n_cls + depth_tokens * cfg.grid[0] * cfg.grid[1];
        let normal = Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        };
        Encoder {
            patch: Self::patch_conv(cfg, patch_depth, device),
            cls: cfg.cls_token.then(|| normal.init([1, 1, c], device)),
            pos: normal.init([1, tokens, c], device),
            blocks: (0..cfg.depth).map(|_| Block::random(cfg, device)).collect(),
            norm: LayerNormConfig::new(c).with_epsilon(cfg.eps).init(device),
            grid: [depth_tokens, cfg.grid[0], cfg.grid[1]],
            width: c,
        }
    }

    /// Tokens after the final norm, `[N, cls + T, C]` (the backbone's "last
    /// hidden state").
    pub fn tokens(&self, x: Tensor<5>) -> Tensor<3> {
        let mut h = self.embed(x);
        for b in &self.blocks {
            h = b.forward(h);
        }
        self.norm.forward(h)
    }

    fn embed(&self, x: Tensor<5>) -> Tensor<3> {
        let [n, ..] = x.dims();
        let c = self.width;
        let t: usize = self.grid.iter().product();
        // [N, C, Td, Gh, Gw] -> [N, T, C], depth-major token order.
        let tok = self.patch.forward(x).reshape([n, c, t]).swap_dims(1, 2);
        let tok = match &self.cls {
            Some(cls) => Tensor::cat(vec![cls.val().expand([n, 1, c]), tok], 1),
            None => tok,
        };
        tok + self.pos.val()
    }

    /// Outputs of the blocks numbered in `taps` (1-based) as feature maps.
    pub fn forward(&self, x: Tensor<5>, taps: &[usize]) -> EncoderOut {
        let mut h = self.embed(x);
        let last = taps.last().copied().unwrap_or(self.blocks.len());
        let mut out = Vec::with_capacity(taps.len());
        for (i, b) in self.blocks.iter().take(last).enumerate() {
            h = b.forward(h);
            if taps.contains(&(i + 1)) {
                let z = if i + 1 == last {
                    self.norm.forward(h.clone())
                } else {
                    h.clone()
                };
                out.push(self.to_map(z));
            }
        }
        EncoderOut { taps: out }
    }

    /// `[N, cls + T, C]` -> `[N, C, Td, Gh, Gw]`, the cls token dropped.
    fn to_map(&self, z: Tensor<3>) -> Tensor<5> {
        let [n, total, c] = z.dims();
        let [td, gh, gw] = self.grid;
        let t = td * gh * gw;
        z.narrow(1, total - t, t)
            .swap_dims(1, 2)
            .reshape([n, c, td, gh, gw])
    }
}
