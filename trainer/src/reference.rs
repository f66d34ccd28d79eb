//! A plain ndarray forward pass of [`Vit2d`]: the ground truth that imports
//! (against the original ONNX run in tract) and the burn model (against the
//! imported weights) are checked with. Written for clarity over speed; the
//! matrix products go through ndarray's optimised GEMM all the same.

use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayView1, ArrayView2, ArrayView3, s};

use crate::import::names;
use crate::vit::{BlockWeights, Vit2d, VitConfig};

#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("the image has {found} channels, the ViT takes {expected}")]
    Channels { expected: usize, found: usize },
    #[error("the image of {h}x{w} pixels is not a whole number of {patch}x{patch} patches")]
    NotPatchMultiple { h: usize, w: usize, patch: usize },
    #[error(
        "the image gives a {}x{} token grid but the position table is {}x{}; \
         resize the table first (resize_pos_embed)",
        image[0], image[1], table[0], table[1]
    )]
    GridMismatch {
        image: [usize; 2],
        table: [usize; 2],
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {message}")]
    Onnx { path: PathBuf, message: String },
}

/// Every intermediate token matrix of a forward pass, `[1 + N, C]` each
/// (no cls row for ViTs without one).
#[derive(Clone, Debug)]
pub struct HiddenStates {
    /// Patch embeddings with cls and position added: the first block's input.
    pub embeddings: Array2<f32>,
    /// Output of each block, before the final norm.
    pub blocks: Vec<Array2<f32>>,
    /// The last block's output after the final LayerNorm.
    pub tokens: Array2<f32>,
}

/// Error function, to double precision (libm's port of FreeBSD's erf).
pub fn erf(x: f64) -> f64 {
    libm::erf(x)
}

/// Exact GELU, `x * Phi(x)`, as `nn.GELU()` computes it (not the tanh form).
pub fn gelu(x: f32) -> f32 {
    let x = f64::from(x);
    (0.5 * x * (1.0 + erf(x * std::f64::consts::FRAC_1_SQRT_2))) as f32
}

/// LayerNorm over the last axis, statistics in f64.
pub fn layer_norm(
    x: ArrayView2<f32>,
    w: ArrayView1<f32>,
    b: ArrayView1<f32>,
    eps: f64,
) -> Array2<f32> {
    let mut out = Array2::zeros(x.raw_dim());
    for (row, mut o) in x.outer_iter().zip(out.outer_iter_mut()) {
        let n = row.len() as f64;
        let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = row
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        let inv = 1.0 / (var + eps).sqrt();
        for ((o, &v), (&w, &b)) in o.iter_mut().zip(row).zip(w.iter().zip(b)) {
            *o = ((f64::from(v) - mean) * inv) as f32 * w + b;
        }
    }
    out
}

/// `x @ w.T + b` for a PyTorch-layout `[out, in]` weight.
fn linear(x: ArrayView2<f32>, w: ArrayView2<f32>, b: ArrayView1<f32>) -> Array2<f32> {
    let mut y = x.dot(&w.t());
    y += &b;
    y
}

fn softmax_rows(x: &mut Array2<f32>) {
    for mut row in x.outer_iter_mut() {
        let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        row.mapv_inplace(|v| (v - max).exp());
        let sum: f32 = row.sum();
        row.mapv_inplace(|v| v / sum);
    }
}

/// One pre-norm block: `x + ls1 * attn(norm1(x))`, then
/// `x + ls2 * mlp(norm2(x))`.
pub fn block_forward(cfg: &VitConfig, b: &BlockWeights, x: ArrayView2<f32>) -> Array2<f32> {
    let c = cfg.width;
    let hd = cfg.head_dim();
    let scale = 1.0 / (hd as f32).sqrt();

    let h = layer_norm(x, b.norm1_w.view(), b.norm1_b.view(), cfg.eps);
    let qkv = linear(h.view(), b.qkv_w.view(), b.qkv_b.view());
    let mut attn_out = Array2::<f32>::zeros((x.nrows(), c));
    for head in 0..cfg.heads {
        let cols = head * hd..(head + 1) * hd;
        let q = qkv.slice(s![.., cols.start..cols.end]);
        let k = qkv.slice(s![.., c + cols.start..c + cols.end]);
        let v = qkv.slice(s![.., 2 * c + cols.start..2 * c + cols.end]);
        let mut scores = q.dot(&k.t());
        scores *= scale;
        softmax_rows(&mut scores);
        attn_out
            .slice_mut(s![.., cols.start..cols.end])
            .assign(&scores.dot(&v));
    }
    let mut a = linear(attn_out.view(), b.proj_w.view(), b.proj_b.view());
    if let Some(ls) = &b.ls1 {
        a *= ls;
    }
    let x = &x + &a;

    let h = layer_norm(x.view(), b.norm2_w.view(), b.norm2_b.view(), cfg.eps);
    let mut m = linear(h.view(), b.fc1_w.view(), b.fc1_b.view());
    m.mapv_inplace(gelu);
    let mut m = linear(m.view(), b.fc2_w.view(), b.fc2_b.view());
    if let Some(ls) = &b.ls2 {
        m *= ls;
    }
    x + m
}

/// Token grid an image of `[C, H, W]` gives.
fn token_grid(cfg: &VitConfig, image: &ArrayView3<f32>) -> Result<[usize; 2], ReferenceError> {
    let (ch, h, w) = image.dim();
    if ch != cfg.in_chans {
        return Err(ReferenceError::Channels {
            expected: cfg.in_chans,
            found: ch,
        });
    }
    let p = cfg.patch;
    if !h.is_multiple_of(p) || !w.is_multiple_of(p) || h == 0 || w == 0 {
        return Err(ReferenceError::NotPatchMultiple { h, w, patch: p });
    }
    Ok([h / p, w / p])
}

/// Patch embedding (a stride-P convolution as one matrix product), cls
/// token in front, position table added.
pub fn embed(vit: &Vit2d, image: ArrayView3<f32>) -> Result<Array2<f32>, ReferenceError> {
    let cfg = &vit.config;
    names::validate(vit).map_err(ReferenceError::Invalid)?;
    let grid = token_grid(cfg, &image)?;
    if grid != cfg.grid {
        return Err(ReferenceError::GridMismatch {
            image: grid,
            table: cfg.grid,
        });
    }
    let (p, ch, c) = (cfg.patch, cfg.in_chans, cfg.width);
    let n = grid[0] * grid[1];
    // Rows: patches in row-major grid order; columns: (channel, y, x) as
    // the conv weight is laid out.
    let mut patches = Array2::<f32>::zeros((n, ch * p * p));
    for gy in 0..grid[0] {
        for gx in 0..grid[1] {
            let window = image.slice(s![.., gy * p..(gy + 1) * p, gx * p..(gx + 1) * p]);
            let mut row = patches.row_mut(gy * grid[1] + gx);
            for (dst, &src) in row.iter_mut().zip(window.iter()) {
                *dst = src;
            }
        }
    }
    let w = vit
        .patch_w
        .view()
        .into_shape_with_order((c, ch * p * p))
        .map_err(|e| ReferenceError::Invalid(format!("patch weight: {e}")))?;
    let emb = linear(patches.view(), w, vit.patch_b.view());
    let mut tokens = match &vit.cls {
        Some(cls) => {
            let mut t = Array2::<f32>::zeros((n + 1, c));
            t.row_mut(0).assign(cls);
            t.slice_mut(s![1.., ..]).assign(&emb);
            t
        }
        None => emb,
    };
    tokens += &vit.pos;
    Ok(tokens)
}

/// The full forward pass, keeping every block's output.
pub fn forward_hidden_states(
    vit: &Vit2d,
    image: ArrayView3<f32>,
) -> Result<HiddenStates, ReferenceError> {
    let embeddings = embed(vit, image)?;
    let mut blocks: Vec<Array2<f32>> = Vec::with_capacity(vit.blocks.len());
    for b in &vit.blocks {
        let x = blocks.last().unwrap_or(&embeddings);
        let next = block_forward(&vit.config, b, x.view());
        blocks.push(next);
    }
    let last = blocks.last().unwrap_or(&embeddings);
    let tokens = layer_norm(
        last.view(),
        vit.norm_w.view(),
        vit.norm_b.view(),
        vit.config.eps,
    );
    Ok(HiddenStates {
        embeddings,
        blocks,
        tokens,
    })
}

/// Final-normed tokens `[1 + N, C]` (cls first) of an image `[C, H, W]`
/// whose token grid must equal the position table's.
pub fn forward_tokens(vit: &Vit2d, image: ArrayView3<f32>) -> Result<Array2<f32>, ReferenceError> {
    let embeddings = embed(vit, image)?;
    let mut x = embeddings;
    for b in &vit.blocks {
        x = block_forward(&vit.config, b, x.view());
    }
    Ok(layer_norm(
        x.view(),
        vit.norm_w.view(),
        vit.norm_b.view(),
        vit.config.eps,
    ))
}

/// A copy of `vit` whose position table is resampled to `grid`, the way HF
/// `Dinov2Model`/`ViTModel` do for other input sizes (bicubic to an exact
/// size, cls entry untouched). The original DINOv2 repository's
/// `scale_factor` variant samples slightly differently.
pub fn resize_pos_embed(vit: &Vit2d, grid: [usize; 2]) -> Result<Vit2d, ReferenceError> {
    names::validate(vit).map_err(ReferenceError::Invalid)?;
    if grid == vit.config.grid {
        return Ok(vit.clone());
    }
    if grid[0] == 0 || grid[1] == 0 {
        return Err(ReferenceError::Invalid(format!(
            "cannot resize the position table to an empty {}x{} grid",
            grid[0], grid[1]
        )));
    }
    let skip = usize::from(vit.config.cls_token);
    let table = crate::inflate::resize_grid(
        vit.pos.slice(s![skip.., ..]).to_owned(),
        vit.config.grid,
        grid,
    );
    let mut out = Array2::<f32>::zeros((skip + grid[0] * grid[1], vit.config.width));
    if skip == 1 {
        out.row_mut(0).assign(&vit.pos.row(0));
    }
    out.slice_mut(s![skip.., ..]).assign(&table);
    let mut resized = vit.clone();
    resized.config.grid = grid;
    resized.pos = out;
    Ok(resized)
}

/// Name of the tensor holding the backbone's final-normed tokens in an ONNX
/// graph: the output of the node that adds (or takes) the final LayerNorm's
/// bias.
fn final_norm_output(proto: &tract_onnx::pb::ModelProto) -> Result<String, String> {
    let graph = proto.graph.as_ref().ok_or("the file has no graph")?;
    let found = names::anchors(graph.initializer.iter().map(|t| t.name.as_str()));
    let (prefix, naming) = found
        .iter()
        .min_by_key(|(p, _)| p.len())
        .ok_or("no ViT patch embedding among the initializers")?;
    let bias = names::final_norm_bias(prefix, *naming);
    graph
        .node
        .iter()
        .find(|n| n.input.contains(&bias))
        .and_then(|n| n.output.first().cloned())
        .ok_or_else(|| format!("no node uses the final LayerNorm bias {bias}"))
}

/// The backbone tokens `[1 + N, C]` of an ONNX ViT run by tract on one
/// image `[C, H, W]`: the graph's output is moved to the final LayerNorm of
/// the backbone, so heads after it (saliency, classifier) do not matter.
pub fn onnx_backbone_tokens(
    onnx_path: impl AsRef<Path>,
    image: ArrayView3<f32>,
) -> Result<Array2<f32>, ReferenceError> {
    use tract_onnx::prelude::{
        Datum, Framework, InferenceFact, InferenceModelExt, IntoRunnable, IntoTValue, Tensor, tvec,
    };
    let path = onnx_path.as_ref();
    let err = |message: String| ReferenceError::Onnx {
        path: path.to_path_buf(),
        message,
    };
    let onnx = tract_onnx::onnx();
    let proto = onnx
        .proto_model_for_path(path)
        .map_err(|e| err(format!("not an ONNX model tract can read: {e:#}")))?;
    let output = final_norm_output(&proto).map_err(err)?;
    let mut model = onnx
        .model_for_proto_model(&proto)
        .map_err(|e| err(format!("{e:#}")))?;
    drop(proto);
    let (ch, h, w) = image.dim();
    model
        .set_input_fact(
            0,
            InferenceFact::dt_shape(f32::datum_type(), tvec![1, ch, h, w]),
        )
        .map_err(|e| err(format!("{e:#}")))?;
    model
        .select_outputs_by_name([output.as_str()])
        .map_err(|e| err(format!("{e:#}")))?;
    let plan = model
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .map_err(|e| err(format!("tract cannot optimise the model: {e:#}")))?;
    let data: Vec<f32> = image.iter().copied().collect();
    let input = Tensor::from_shape(&[1, ch, h, w], &data).map_err(|e| err(format!("{e:#}")))?;
    let outputs = plan
        .run(tvec![input.into_tvalue()])
        .map_err(|e| err(format!("{e:#}")))?;
    let out = outputs
        .first()
        .ok_or_else(|| err("the model produced no output".into()))?;
    let out = out.cast_to::<f32>().map_err(|e| err(format!("{e:#}")))?;
    let shape = out.shape().to_vec();
    let [1, tokens, width] = shape[..] else {
        return Err(err(format!(
            "{output} has shape {shape:?}, expected [1, tokens, width]"
        )));
    };
    let values = out
        .try_as_plain_ram()
        .and_then(|v| v.as_slice::<f32>().map(<[f32]>::to_vec))
        .map_err(|e| err(format!("{e:#}")))?;
    Array2::from_shape_vec((tokens, width), values).map_err(|e| err(e.to_string()))
}

/// ImageNet normalisation of an RGB image in [0, 1], `[3, H, W]`.
pub fn imagenet_normalise(image: &mut ndarray::Array3<f32>) {
    const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
    const STD: [f32; 3] = [0.229, 0.224, 0.225];
    for (ch, mut plane) in image.outer_iter_mut().enumerate().take(3) {
        plane.mapv_inplace(|v| (v - MEAN[ch]) / STD[ch]);
    }
}

/// Largest absolute difference of two equally shaped arrays (`None` when
/// shapes differ).
pub fn max_abs_diff(a: ArrayView2<f32>, b: ArrayView2<f32>) -> Option<f32> {
    (a.shape() == b.shape()).then(|| {
        a.iter()
            .zip(b.iter())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        // Values from Abramowitz & Stegun table 7.1 / mpmath.
        let cases = [
            (0.0, 0.0),
            (0.1, 0.112_462_916_018_284_9),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.5, 0.999_999_256_901_627_7),
            (-1.0, -0.842_700_792_949_714_9),
        ];
        for (x, want) in cases {
            assert!((erf(x) - want).abs() < 1e-12, "erf({x}) = {}", erf(x));
        }
    }

    #[test]
    fn gelu_is_exact() {
        assert_eq!(gelu(0.0), 0.0);
        // x * Phi(x) at x = 1 and -1.
        assert!((gelu(1.0) - 0.841_344_8).abs() < 1e-6);
        assert!((gelu(-1.0) + 0.158_655_3).abs() < 1e-6);
    }
}
