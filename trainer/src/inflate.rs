//! Weight inflation: a 2D ViT becomes the encoder of a 3D model.
//!
//! The patch embedding `[C, 3, P, P]` becomes `[C, Cin, Dp, P, P]`: the RGB
//! kernels are summed (medical volumes are grey), spread evenly over the
//! `Cin` input channels, then placed over depth by one of two rules:
//! - `centering` (TransSeg's default): the kernel sits on the middle slice
//!   (index `Dp / 2`) and the other slices are zero, so the inflated model
//!   starts out computing exactly the 2D model on the middle slice;
//! - `average` (I3D): the kernel is repeated over depth and divided by `Dp`,
//!   so a stack of identical slices gives exactly the 2D result.
//!
//! Position embeddings: the 2D grid is resized to the new in-plane token grid
//! with PyTorch's bicubic interpolation (`align_corners=False`, A = -0.75,
//! no antialiasing, as timm's `resample_abs_pos_embed`); the cls entry is
//! kept. When a model has several depth tokens (volumetric tiles), the 2D
//! table is repeated over depth: every depth token starts with the same
//! in-plane position code, and depth order is left for fine-tuning to learn.
//! This keeps the pretrained in-plane geometry intact, where a 3D
//! interpolation would invent a depth axis the 2D model never had.
//!
//! Everything else (blocks, norms, cls token) is reused unchanged, optionally
//! keeping only the first K blocks for small edge models.

use ndarray::{Array1, Array2, Array5, Axis, s};
use serde::{Deserialize, Serialize};

use crate::vit::{BlockWeights, Vit2d, VitConfig};

/// How the 2D patch kernel is spread over depth.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DepthRule {
    Centering,
    Average,
}

/// Where the encoder's weights come from (the paper's ablation arms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// Pretrained 2D weights inflated with a depth rule.
    Inflated(DepthRule),
    /// Same architecture, random weights.
    Scratch,
    /// Pretrained 2D weights with patch depth 1: the 2D model applied to one
    /// slice (slab depth 1).
    TwoD,
}

impl Init {
    pub fn parse(s: &str) -> Result<Init, InflateError> {
        Ok(match s {
            "inflated" | "centering" | "inflated-centering" => Init::Inflated(DepthRule::Centering),
            "average" | "inflated-average" => Init::Inflated(DepthRule::Average),
            "scratch" => Init::Scratch,
            "2d" => Init::TwoD,
            other => {
                return Err(InflateError::Spec(format!(
                    "unknown init `{other}`: use inflated, inflated-average, scratch or 2d"
                )));
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Init::Inflated(DepthRule::Centering) => "inflated",
            Init::Inflated(DepthRule::Average) => "inflated-average",
            Init::Scratch => "scratch",
            Init::TwoD => "2d",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InflateError {
    #[error("inflation: {0}")]
    Spec(String),
}

/// The 3D encoder's geometry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InflateSpec {
    /// Input channels of the 3D model (MRI: 1; multi-sequence: several).
    pub in_channels: usize,
    /// Depth of the patch kernel (slab models: the slab depth).
    pub patch_depth: usize,
    /// Number of tokens along depth (slab models: 1).
    pub depth_tokens: usize,
    /// In-plane token grid (rows, cols) = in-plane tile / P.
    pub grid: [usize; 2],
    /// Keep only the first `blocks` transformer blocks (None: all).
    pub blocks: Option<usize>,
    pub rule: DepthRule,
}

/// Weights of the 3D encoder.
#[derive(Clone, Debug)]
pub struct Vit3dWeights {
    /// Block count, width and heads of the kept encoder; `grid` is the
    /// in-plane token grid and `in_chans` the 3D model's input channels.
    pub config: VitConfig,
    pub patch_depth: usize,
    pub depth_tokens: usize,
    /// `[C, Cin, Dp, P, P]`.
    pub patch_w: Array5<f32>,
    pub patch_b: Array1<f32>,
    pub cls: Option<Array1<f32>>,
    /// `[cls + depth_tokens * rows * cols, C]`, depth-major.
    pub pos: Array2<f32>,
    pub blocks: Vec<BlockWeights>,
    pub norm_w: Array1<f32>,
    pub norm_b: Array1<f32>,
}

impl Vit3dWeights {
    /// The 2D model itself as a 3D encoder of patch depth 1 (RGB input kept,
    /// nothing summed or resized): what the import check runs.
    pub fn exact_2d(v: &Vit2d) -> Vit3dWeights {
        Vit3dWeights {
            config: v.config.clone(),
            patch_depth: 1,
            depth_tokens: 1,
            patch_w: v.patch_w.clone().insert_axis(Axis(2)),
            patch_b: v.patch_b.clone(),
            cls: v.cls.clone(),
            pos: v.pos.clone(),
            blocks: v.blocks.clone(),
            norm_w: v.norm_w.clone(),
            norm_b: v.norm_b.clone(),
        }
    }
}

/// Inflates a 2D ViT to a 3D encoder.
pub fn inflate(v: &Vit2d, spec: &InflateSpec) -> Result<Vit3dWeights, InflateError> {
    let cfg = &v.config;
    if spec.in_channels == 0 || spec.patch_depth == 0 || spec.depth_tokens == 0 {
        return Err(InflateError::Spec(
            "input channels, patch depth and depth tokens must be at least 1".into(),
        ));
    }
    if spec.grid[0] == 0 || spec.grid[1] == 0 {
        return Err(InflateError::Spec(
            "the token grid must not be empty".into(),
        ));
    }
    let keep = spec.blocks.unwrap_or(cfg.depth);
    if keep == 0 || keep > cfg.depth {
        return Err(InflateError::Spec(format!(
            "cannot keep {keep} blocks of a {}-block ViT",
            cfg.depth
        )));
    }
    let (c, p) = (cfg.width, cfg.patch);
    let (cin, dp) = (spec.in_channels, spec.patch_depth);

    // Grey kernel: RGB summed, then spread over the input channels.
    let grey = v.patch_w.sum_axis(Axis(1)) / cin as f32; // [C, P, P]
    let mut patch_w = Array5::<f32>::zeros((c, cin, dp, p, p));
    for ci in 0..cin {
        match spec.rule {
            DepthRule::Centering => {
                patch_w.slice_mut(s![.., ci, dp / 2, .., ..]).assign(&grey);
            }
            DepthRule::Average => {
                let k = &grey / dp as f32;
                for d in 0..dp {
                    patch_w.slice_mut(s![.., ci, d, .., ..]).assign(&k);
                }
            }
        }
    }

    let n_cls = usize::from(cfg.cls_token);
    let grid2d = resize_grid(v.pos.slice(s![n_cls.., ..]).to_owned(), cfg.grid, spec.grid);
    let tokens = spec.depth_tokens * spec.grid[0] * spec.grid[1];
    let mut pos = Array2::<f32>::zeros((n_cls + tokens, c));
    if n_cls == 1 {
        pos.row_mut(0).assign(&v.pos.row(0));
    }
    let plane = spec.grid[0] * spec.grid[1];
    for d in 0..spec.depth_tokens {
        pos.slice_mut(s![n_cls + d * plane..n_cls + (d + 1) * plane, ..])
            .assign(&grid2d);
    }

    let mut config = cfg.clone();
    config.depth = keep;
    config.grid = spec.grid;
    config.in_chans = cin;
    Ok(Vit3dWeights {
        config,
        patch_depth: dp,
        depth_tokens: spec.depth_tokens,
        patch_w,
        patch_b: v.patch_b.clone(),
        cls: v.cls.clone(),
        pos,
        blocks: v.blocks[..keep].to_vec(),
        norm_w: v.norm_w.clone(),
        norm_b: v.norm_b.clone(),
    })
}

/// Resizes a `[rows*cols, C]` position grid to `to` (identity when equal).
pub fn resize_grid(grid: Array2<f32>, from: [usize; 2], to: [usize; 2]) -> Array2<f32> {
    if from == to {
        return grid;
    }
    let c = grid.ncols();
    let mut out = Array2::<f32>::zeros((to[0] * to[1], c));
    let rows = bicubic_taps(from[0], to[0]);
    let cols = bicubic_taps(from[1], to[1]);
    for (oy, ry) in rows.iter().enumerate() {
        for (ox, rx) in cols.iter().enumerate() {
            let mut acc = Array1::<f64>::zeros(c);
            for &(iy, wy) in ry {
                for &(ix, wx) in rx {
                    let w = wy * wx;
                    let src = grid.row(iy * from[1] + ix);
                    acc.zip_mut_with(&src, |a, &b| *a += w * f64::from(b));
                }
            }
            out.row_mut(oy * to[1] + ox).assign(&acc.mapv(|x| x as f32));
        }
    }
    out
}

/// For each output index, the (input index, weight) taps of PyTorch's
/// bicubic upsampling along one axis: half-pixel centres, A = -0.75, border
/// indices clamped.
fn bicubic_taps(n_in: usize, n_out: usize) -> Vec<Vec<(usize, f64)>> {
    const A: f64 = -0.75;
    let cubic1 = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0; // |x| <= 1
    let cubic2 = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A; // 1 < |x| < 2
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|o| {
            let src = (o as f64 + 0.5) * scale - 0.5;
            let i0 = src.floor();
            let t = src - i0;
            let w = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
            (0..4)
                .map(|k| {
                    let idx = (i0 as i64 - 1 + k as i64).clamp(0, n_in as i64 - 1) as usize;
                    (idx, w[k])
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array4;

    fn tiny() -> Vit2d {
        let c = 4;
        let p = 2;
        let block = BlockWeights {
            norm1_w: Array1::ones(c),
            norm1_b: Array1::zeros(c),
            qkv_w: Array2::zeros((3 * c, c)),
            qkv_b: Array1::zeros(3 * c),
            proj_w: Array2::zeros((c, c)),
            proj_b: Array1::zeros(c),
            ls1: None,
            norm2_w: Array1::ones(c),
            norm2_b: Array1::zeros(c),
            fc1_w: Array2::zeros((8, c)),
            fc1_b: Array1::zeros(8),
            fc2_w: Array2::zeros((c, 8)),
            fc2_b: Array1::zeros(c),
            ls2: None,
        };
        Vit2d {
            config: VitConfig {
                patch: p,
                width: c,
                depth: 2,
                heads: 2,
                mlp: 8,
                in_chans: 3,
                grid: [2, 2],
                cls_token: true,
                layer_scale: false,
                eps: 1e-6,
            },
            patch_w: Array4::from_shape_fn((c, 3, p, p), |(a, b, i, j)| {
                (a * 27 + b * 9 + i * 3 + j) as f32
            }),
            patch_b: Array1::from_shape_fn(c, |i| i as f32),
            cls: Some(Array1::from_elem(c, 0.5)),
            pos: Array2::from_shape_fn((5, c), |(t, i)| (t * 10 + i) as f32),
            blocks: vec![block.clone(), block],
            norm_w: Array1::ones(c),
            norm_b: Array1::zeros(c),
        }
    }

    fn spec(rule: DepthRule) -> InflateSpec {
        InflateSpec {
            in_channels: 2,
            patch_depth: 3,
            depth_tokens: 2,
            grid: [2, 2],
            blocks: Some(1),
            rule,
        }
    }

    #[test]
    fn centering_puts_the_grey_kernel_on_the_middle_slice() {
        let v = tiny();
        let w = inflate(&v, &spec(DepthRule::Centering)).unwrap();
        assert_eq!(w.patch_w.dim(), (4, 2, 3, 2, 2));
        let grey = v.patch_w.sum_axis(Axis(1));
        for ci in 0..2 {
            assert_eq!(w.patch_w.slice(s![.., ci, 1, .., ..]), &grey / 2.0);
            assert!(
                w.patch_w
                    .slice(s![.., ci, 0, .., ..])
                    .iter()
                    .all(|&x| x == 0.0)
            );
            assert!(
                w.patch_w
                    .slice(s![.., ci, 2, .., ..])
                    .iter()
                    .all(|&x| x == 0.0)
            );
        }
        assert_eq!(w.blocks.len(), 1);
        assert_eq!(w.config.depth, 1);
        assert_eq!(w.patch_b, v.patch_b);
    }

    #[test]
    fn average_spreads_the_kernel_evenly() {
        let v = tiny();
        let w = inflate(&v, &spec(DepthRule::Average)).unwrap();
        let total = w.patch_w.sum_axis(Axis(2)).sum_axis(Axis(1));
        let grey = v.patch_w.sum_axis(Axis(1));
        for (a, b) in total.iter().zip(grey.iter()) {
            assert!((a - b).abs() < 1e-4);
        }
    }

    #[test]
    fn position_table_repeats_over_depth_and_keeps_cls() {
        let v = tiny();
        let w = inflate(&v, &spec(DepthRule::Centering)).unwrap();
        assert_eq!(w.pos.dim(), (1 + 2 * 4, 4));
        assert_eq!(w.pos.row(0), v.pos.row(0));
        assert_eq!(w.pos.slice(s![1..5, ..]), v.pos.slice(s![1..5, ..]));
        assert_eq!(w.pos.slice(s![5..9, ..]), v.pos.slice(s![1..5, ..]));
    }

    #[test]
    fn bicubic_matches_reference_implementations() {
        // OpenCV's INTER_CUBIC uses PyTorch's kernel (A = -0.75, half-pixel
        // centres, clamped borders, no antialias): values from
        // cv2.resize((np.arange(16.).reshape(4, 4)**2).astype(np.float32),
        //            dsize, interpolation=cv2.INTER_CUBIC).
        let grid = Array2::from_shape_fn((16, 1), |(i, _)| (i * i) as f32);
        let down = resize_grid(grid.clone(), [4, 4], [3, 3]);
        let expect_down = [
            1.681_723, 5.101_851, 12.697_905, 35.605_324, 54.125, 76.820_6, 136.343_73, 169.962_95,
            207.758_1,
        ];
        let up = resize_grid(grid, [4, 4], [5, 6]);
        let expect_up = [
            -1.016_618, -0.950_688, -0.130_945, 1.312_277, 4.548_687, 6.961_84, 5.733_064,
            8.447_689, 13.601_091, 18.128_242, 25.698_315, 30.760_162, 32.871_53, 39.093_75,
            49.986_11, 58.597_22, 71.906_25, 80.475_69, 89.865_98, 99.595_81, 116.227_12,
            128.922_21, 147.970_17, 160.047_23, 146.647_66, 159.026_18, 179.991_15, 195.770_17,
            219.151_82, 233.877_56,
        ];
        for (a, b) in down.iter().zip(expect_down).chain(up.iter().zip(expect_up)) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
    }

    #[test]
    fn bicubic_matches_torch_downsample_with_clamped_taps() {
        // F.interpolate(torch.arange(4.)[None, None, None], size=(1, 2),
        // mode="bicubic", align_corners=False) = [0.40625, 2.59375].
        let grid = Array2::from_shape_fn((4, 1), |(i, _)| i as f32);
        let out = resize_grid(grid, [1, 4], [1, 2]);
        assert!((out[[0, 0]] - 0.406_25).abs() < 1e-6, "{out}");
        assert!((out[[1, 0]] - 2.593_75).abs() < 1e-6, "{out}");
    }

    #[test]
    fn bicubic_keeps_constants_and_identity() {
        let grid = Array2::from_elem((9, 2), 3.0f32);
        let out = resize_grid(grid.clone(), [3, 3], [5, 4]);
        assert!(out.iter().all(|&x| (x - 3.0).abs() < 1e-5));
        assert_eq!(resize_grid(grid.clone(), [3, 3], [3, 3]), grid);
    }

    #[test]
    fn rejects_bad_specs() {
        let v = tiny();
        let mut s = spec(DepthRule::Centering);
        s.blocks = Some(3);
        assert!(
            inflate(&v, &s)
                .unwrap_err()
                .to_string()
                .contains("3 blocks")
        );
        s.blocks = None;
        s.in_channels = 0;
        assert!(inflate(&v, &s).is_err());
    }
}
