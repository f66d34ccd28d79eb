//! UNETR-style decoder, generalised to any patch size.
//!
//! Level j (1..=L) upsamples by `factors[j-1]`; L = number of taps. The
//! deepest tap is the bottleneck; tap L-1-j (counting from 0, shallow
//! first) is brought to level j by j deconvolution + conv-block steps (as
//! UNETR's `PrUpBlock`) and concatenated there; the last level concatenates
//! a conv block on the raw input. With patch 16 and taps 3/6/9/12 this is
//! UNETR; with DINOv2's patch 14 the levels are 7 and 2.
//!
//! Slab models run the same code with depth 1 throughout: the D input
//! slices become channels of the input skip and every kernel has depth 1.

use burn::module::Module;
use burn::nn::conv::{Conv3d, Conv3dConfig, ConvTranspose3d, ConvTranspose3dConfig};
use burn::nn::{InstanceNorm, InstanceNormConfig, PaddingConfig3d};
use burn::tensor::activation::leaky_relu;
use burn::tensor::{Device, Tensor};

pub const LEAKY_SLOPE: f64 = 0.01;
pub const NORM_EPS: f64 = 1e-5;

/// conv-norm-lrelu, twice (UNETR's `UnetBasicBlock`).
#[derive(Module, Debug)]
pub struct ConvBlock {
    pub conv1: Conv3d,
    pub norm1: InstanceNorm,
    pub conv2: Conv3d,
    pub norm2: InstanceNorm,
}

impl ConvBlock {
    pub fn new(cin: usize, cout: usize, depth_kernel: usize, device: &Device) -> ConvBlock {
        let conv = |i, o| {
            Conv3dConfig::new([i, o], [depth_kernel, 3, 3])
                .with_padding(PaddingConfig3d::Explicit(depth_kernel / 2, 1, 1))
                .init(device)
        };
        let norm = |c| {
            InstanceNormConfig::new(c)
                .with_epsilon(NORM_EPS)
                .init(device)
        };
        ConvBlock {
            conv1: conv(cin, cout),
            norm1: norm(cout),
            conv2: conv(cout, cout),
            norm2: norm(cout),
        }
    }

    pub fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        let x = leaky_relu(self.norm1.forward(self.conv1.forward(x)), LEAKY_SLOPE);
        leaky_relu(self.norm2.forward(self.conv2.forward(x)), LEAKY_SLOPE)
    }
}

fn deconv(cin: usize, cout: usize, fd: usize, fhw: usize, device: &Device) -> ConvTranspose3d {
    ConvTranspose3dConfig::new([cin, cout], [fd, fhw, fhw])
        .with_stride([fd, fhw, fhw])
        .init(device)
}

/// One step towards full resolution: deconvolution then conv block.
#[derive(Module, Debug)]
pub struct UpStep {
    pub up: ConvTranspose3d,
    pub block: ConvBlock,
}

impl UpStep {
    pub fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        self.block.forward(self.up.forward(x))
    }
}

/// Decoder level j: upsample the path, concatenate the skip, conv block.
#[derive(Module, Debug)]
pub struct Level {
    pub up: ConvTranspose3d,
    pub block: ConvBlock,
}

#[derive(Module, Debug)]
pub struct Decoder {
    /// For levels 1..L-1: the chain that brings a tap to that level.
    pub skips: Vec<Vec<UpStep>>,
    /// Conv block on the raw input (the full-resolution skip).
    pub input_block: ConvBlock,
    pub levels: Vec<Level>,
    /// 1x1x1 convolution to class logits.
    pub head: Conv3d,
}

/// Decoder geometry.
pub struct DecoderSpec {
    pub width: usize,
    pub features: usize,
    pub classes: usize,
    /// Channels of the input skip (slab: Cin * D).
    pub input_channels: usize,
    pub factors_hw: Vec<usize>,
    pub factors_d: Vec<usize>,
    /// Depth of the 3x3 conv kernels: 1 for slabs, 3 for volumes.
    pub depth_kernel: usize,
}

impl DecoderSpec {
    /// Channels at level j (0 = token grid): features * 2^(L-j).
    pub fn channels(&self, j: usize) -> usize {
        let l = self.factors_hw.len();
        self.features << (l - j)
    }
}

impl Decoder {
    pub fn new(s: &DecoderSpec, device: &Device) -> Decoder {
        let l = s.factors_hw.len();
        let dk = s.depth_kernel;
        let skips = (1..l)
            .map(|j| {
                let ch = s.channels(j);
                (0..j)
                    .map(|k| UpStep {
                        up: deconv(
                            if k == 0 { s.width } else { ch },
                            ch,
                            s.factors_d[k],
                            s.factors_hw[k],
                            device,
                        ),
                        block: ConvBlock::new(ch, ch, dk, device),
                    })
                    .collect()
            })
            .collect();
        let levels = (1..=l)
            .map(|j| {
                let cin = if j == 1 { s.width } else { s.channels(j - 1) };
                let ch = s.channels(j);
                Level {
                    up: deconv(cin, ch, s.factors_d[j - 1], s.factors_hw[j - 1], device),
                    block: ConvBlock::new(2 * ch, ch, dk, device),
                }
            })
            .collect();
        Decoder {
            skips,
            input_block: ConvBlock::new(s.input_channels, s.channels(l), dk, device),
            levels,
            head: Conv3dConfig::new([s.channels(l), s.classes], [1, 1, 1]).init(device),
        }
    }

    /// `taps`: encoder maps shallow to deep (`[N, C, Td, Gh, Gw]`); `input`:
    /// the raw input as `[N, Cskip, D, H, W]`. Returns logits
    /// `[N, K, D, H, W]`.
    pub fn forward(&self, taps: Vec<Tensor<5>>, input: Tensor<5>) -> Tensor<5> {
        let l = self.levels.len();
        let mut taps = taps;
        let mut x = taps.pop().expect("the encoder returns one map per tap");
        // taps now holds the shallower maps; level j takes taps[l-1-j].
        for (j, level) in self.levels.iter().enumerate() {
            let j = j + 1;
            let skip = if j < l {
                let mut s = taps[l - 1 - j].clone();
                for step in &self.skips[j - 1] {
                    s = step.forward(s);
                }
                s
            } else {
                self.input_block.forward(input.clone())
            };
            x = level
                .block
                .forward(Tensor::cat(vec![level.up.forward(x), skip], 1));
        }
        self.head.forward(x)
    }
}
