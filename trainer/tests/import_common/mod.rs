//! Shared by the import tests: tiny random ViTs, writers for the timm and
//! HF layouts, and comparisons.
#![allow(dead_code)]

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use infl8_trainer::vit::{BlockWeights, Vit2d, VitConfig};
use ndarray::{Array, Array1, Array3, Dimension, ShapeBuilder};
use safetensors::tensor::{Dtype, View};

/// Deterministic values without a rand dependency (64-bit LCG).
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Self(
            seed.wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407),
        )
    }
    /// Uniform in [-1, 1).
    pub fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn array<D: Dimension, Sh: ShapeBuilder<Dim = D>>(
        &mut self,
        shape: Sh,
        scale: f32,
    ) -> Array<f32, D> {
        Array::from_shape_simple_fn(shape, || self.next() * scale)
    }
}

pub fn tiny_config() -> VitConfig {
    VitConfig {
        patch: 4,
        width: 32,
        depth: 2,
        heads: 2,
        mlp: 64,
        in_chans: 3,
        grid: [3, 3],
        cls_token: true,
        layer_scale: true,
        eps: 1e-6,
    }
}

pub fn random_vit(config: &VitConfig, seed: u64) -> Vit2d {
    let mut r = Lcg::new(seed);
    let c = config.width;
    let m = config.mlp;
    let p = config.patch;
    let tokens = usize::from(config.cls_token) + config.grid[0] * config.grid[1];
    let ones = |r: &mut Lcg| Array1::from_shape_simple_fn(c, || 1.0 + 0.2 * r.next());
    let blocks = (0..config.depth)
        .map(|_| BlockWeights {
            norm1_w: ones(&mut r),
            norm1_b: r.array(c, 0.1),
            qkv_w: r.array((3 * c, c), 0.3),
            qkv_b: r.array(3 * c, 0.1),
            proj_w: r.array((c, c), 0.3),
            proj_b: r.array(c, 0.1),
            ls1: config.layer_scale.then(|| r.array(c, 0.5)),
            norm2_w: ones(&mut r),
            norm2_b: r.array(c, 0.1),
            fc1_w: r.array((m, c), 0.3),
            fc1_b: r.array(m, 0.1),
            fc2_w: r.array((c, m), 0.3),
            fc2_b: r.array(c, 0.1),
            ls2: config.layer_scale.then(|| r.array(c, 0.5)),
        })
        .collect();
    Vit2d {
        config: config.clone(),
        patch_w: r.array((c, config.in_chans, p, p), 0.2),
        patch_b: r.array(c, 0.1),
        cls: config.cls_token.then(|| r.array(c, 0.5)),
        pos: r.array((tokens, c), 0.5),
        blocks,
        norm_w: ones(&mut r),
        norm_b: r.array(c, 0.1),
    }
}

/// A named tensor to write: shape and f32 values.
pub type Named = Vec<(String, Vec<usize>, Vec<f32>)>;

fn push<D: Dimension>(out: &mut Named, name: impl Into<String>, a: &Array<f32, D>) {
    out.push((name.into(), a.shape().to_vec(), a.iter().copied().collect()));
}

fn push_shaped<D: Dimension>(
    out: &mut Named,
    name: impl Into<String>,
    shape: &[usize],
    a: &Array<f32, D>,
) {
    out.push((name.into(), shape.to_vec(), a.iter().copied().collect()));
}

/// The timm `VisionTransformer` state dict of `vit`.
pub fn timm_tensors(vit: &Vit2d, prefix: &str) -> Named {
    let c = vit.config.width;
    let mut t = Named::new();
    push(
        &mut t,
        format!("{prefix}patch_embed.proj.weight"),
        &vit.patch_w,
    );
    push(
        &mut t,
        format!("{prefix}patch_embed.proj.bias"),
        &vit.patch_b,
    );
    if let Some(cls) = &vit.cls {
        push_shaped(&mut t, format!("{prefix}cls_token"), &[1, 1, c], cls);
    }
    push_shaped(
        &mut t,
        format!("{prefix}pos_embed"),
        &[1, vit.pos.nrows(), c],
        &vit.pos,
    );
    for (i, b) in vit.blocks.iter().enumerate() {
        let n = |s: &str| format!("{prefix}blocks.{i}.{s}");
        push(&mut t, n("norm1.weight"), &b.norm1_w);
        push(&mut t, n("norm1.bias"), &b.norm1_b);
        push(&mut t, n("attn.qkv.weight"), &b.qkv_w);
        push(&mut t, n("attn.qkv.bias"), &b.qkv_b);
        push(&mut t, n("attn.proj.weight"), &b.proj_w);
        push(&mut t, n("attn.proj.bias"), &b.proj_b);
        if let Some(ls) = &b.ls1 {
            push(&mut t, n("ls1.gamma"), ls);
        }
        push(&mut t, n("norm2.weight"), &b.norm2_w);
        push(&mut t, n("norm2.bias"), &b.norm2_b);
        push(&mut t, n("mlp.fc1.weight"), &b.fc1_w);
        push(&mut t, n("mlp.fc1.bias"), &b.fc1_b);
        push(&mut t, n("mlp.fc2.weight"), &b.fc2_w);
        push(&mut t, n("mlp.fc2.bias"), &b.fc2_b);
        if let Some(ls) = &b.ls2 {
            push(&mut t, n("ls2.gamma"), ls);
        }
    }
    push(&mut t, format!("{prefix}norm.weight"), &vit.norm_w);
    push(&mut t, format!("{prefix}norm.bias"), &vit.norm_b);
    t
}

/// The HF state dict of `vit`: `Dinov2Model` names when `dinov2`, else
/// `ViTModel` names (which have no layer scale).
pub fn hf_tensors(vit: &Vit2d, prefix: &str, dinov2: bool) -> Named {
    let c = vit.config.width;
    let mut t = Named::new();
    let e = |s: &str| format!("{prefix}embeddings.{s}");
    push(
        &mut t,
        e("patch_embeddings.projection.weight"),
        &vit.patch_w,
    );
    push(&mut t, e("patch_embeddings.projection.bias"), &vit.patch_b);
    if let Some(cls) = &vit.cls {
        push_shaped(&mut t, e("cls_token"), &[1, 1, c], cls);
    }
    push_shaped(
        &mut t,
        e("position_embeddings"),
        &[1, vit.pos.nrows(), c],
        &vit.pos,
    );
    for (i, b) in vit.blocks.iter().enumerate() {
        let n = |s: &str| format!("{prefix}encoder.layer.{i}.{s}");
        let (norm1, norm2, fc1, fc2) = if dinov2 {
            ("norm1", "norm2", "mlp.fc1", "mlp.fc2")
        } else {
            (
                "layernorm_before",
                "layernorm_after",
                "intermediate.dense",
                "output.dense",
            )
        };
        push(&mut t, n(&format!("{norm1}.weight")), &b.norm1_w);
        push(&mut t, n(&format!("{norm1}.bias")), &b.norm1_b);
        for (j, part) in ["query", "key", "value"].iter().enumerate() {
            let w = b
                .qkv_w
                .slice(ndarray::s![j * c..(j + 1) * c, ..])
                .to_owned();
            let bias = b.qkv_b.slice(ndarray::s![j * c..(j + 1) * c]).to_owned();
            push(&mut t, n(&format!("attention.attention.{part}.weight")), &w);
            push(
                &mut t,
                n(&format!("attention.attention.{part}.bias")),
                &bias,
            );
        }
        push(&mut t, n("attention.output.dense.weight"), &b.proj_w);
        push(&mut t, n("attention.output.dense.bias"), &b.proj_b);
        if let Some(ls) = &b.ls1 {
            push(&mut t, n("layer_scale1.lambda1"), ls);
        }
        push(&mut t, n(&format!("{norm2}.weight")), &b.norm2_w);
        push(&mut t, n(&format!("{norm2}.bias")), &b.norm2_b);
        push(&mut t, n(&format!("{fc1}.weight")), &b.fc1_w);
        push(&mut t, n(&format!("{fc1}.bias")), &b.fc1_b);
        push(&mut t, n(&format!("{fc2}.weight")), &b.fc2_w);
        push(&mut t, n(&format!("{fc2}.bias")), &b.fc2_b);
        if let Some(ls) = &b.ls2 {
            push(&mut t, n("layer_scale2.lambda1"), ls);
        }
    }
    push(&mut t, format!("{prefix}layernorm.weight"), &vit.norm_w);
    push(&mut t, format!("{prefix}layernorm.bias"), &vit.norm_b);
    t
}

struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes f32 tensors (bf16 for the names in `bf16`) to a SafeTensors file.
pub fn write_safetensors_with(
    path: &Path,
    tensors: &Named,
    metadata: Option<HashMap<String, String>>,
    bf16: &[&str],
) {
    let raws: Vec<(String, Raw)> = tensors
        .iter()
        .map(|(name, shape, values)| {
            let raw = if bf16.contains(&name.as_str()) {
                Raw {
                    dtype: Dtype::BF16,
                    shape: shape.clone(),
                    bytes: values
                        .iter()
                        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                        .collect(),
                }
            } else {
                Raw {
                    dtype: Dtype::F32,
                    shape: shape.clone(),
                    bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                }
            };
            (name.clone(), raw)
        })
        .collect();
    let bytes = safetensors::serialize(raws.iter().map(|(n, r)| (n.as_str(), r)), metadata)
        .expect("serialize");
    std::fs::write(path, bytes).expect("write safetensors");
}

pub fn write_safetensors(path: &Path, tensors: &Named) {
    write_safetensors_with(path, tensors, None, &[]);
}

pub fn assert_vit_eq(a: &Vit2d, b: &Vit2d) {
    assert_eq!(a.config, b.config);
    assert_eq!(a.patch_w, b.patch_w, "patch_w");
    assert_eq!(a.patch_b, b.patch_b, "patch_b");
    assert_eq!(a.cls, b.cls, "cls");
    assert_eq!(a.pos, b.pos, "pos");
    assert_eq!(a.blocks.len(), b.blocks.len());
    for (i, (x, y)) in a.blocks.iter().zip(&b.blocks).enumerate() {
        assert_eq!(x.norm1_w, y.norm1_w, "block {i} norm1_w");
        assert_eq!(x.norm1_b, y.norm1_b, "block {i} norm1_b");
        assert_eq!(x.qkv_w, y.qkv_w, "block {i} qkv_w");
        assert_eq!(x.qkv_b, y.qkv_b, "block {i} qkv_b");
        assert_eq!(x.proj_w, y.proj_w, "block {i} proj_w");
        assert_eq!(x.proj_b, y.proj_b, "block {i} proj_b");
        assert_eq!(x.ls1, y.ls1, "block {i} ls1");
        assert_eq!(x.norm2_w, y.norm2_w, "block {i} norm2_w");
        assert_eq!(x.norm2_b, y.norm2_b, "block {i} norm2_b");
        assert_eq!(x.fc1_w, y.fc1_w, "block {i} fc1_w");
        assert_eq!(x.fc1_b, y.fc1_b, "block {i} fc1_b");
        assert_eq!(x.fc2_w, y.fc2_w, "block {i} fc2_w");
        assert_eq!(x.fc2_b, y.fc2_b, "block {i} fc2_b");
        assert_eq!(x.ls2, y.ls2, "block {i} ls2");
    }
    assert_eq!(a.norm_w, b.norm_w, "norm_w");
    assert_eq!(a.norm_b, b.norm_b, "norm_b");
}

/// A smooth deterministic RGB image in [0, 1], `[3, h, w]`.
pub fn smooth_image(h: usize, w: usize) -> Array3<f32> {
    Array3::from_shape_fn((3, h, w), |(c, y, x)| {
        let (y, x) = (y as f32 / h as f32, x as f32 / w as f32);
        let v = match c {
            0 => 0.5 + 0.5 * (6.0 * x + 2.0 * y).sin(),
            1 => 0.5 + 0.5 * (5.0 * y - 3.0 * x).cos(),
            _ => x * y,
        };
        v.clamp(0.0, 1.0)
    })
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("trainer/ has a parent")
        .to_path_buf()
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}
