//! The segmentation model's architecture, serialisable so that checkpoints,
//! the exporter and the trainer agree on it.

use serde::{Deserialize, Serialize};

use crate::inflate::Init;
use crate::vit::VitConfig;

/// The two model shapes of the method.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelShape {
    /// TransSeg 2.5D: `depth` neighbouring slices in, the middle slice out;
    /// the patch spans the whole slab, so there is one depth token.
    Slab { depth: usize },
    /// 3D tiles of `tile_depth` slices, patches of `patch_depth` slices; the
    /// model predicts the whole tile.
    Volumetric {
        tile_depth: usize,
        patch_depth: usize,
    },
}

impl ModelShape {
    pub fn patch_depth(&self) -> usize {
        match *self {
            ModelShape::Slab { depth } => depth,
            ModelShape::Volumetric { patch_depth, .. } => patch_depth,
        }
    }

    /// Slices the model sees at once.
    pub fn input_depth(&self) -> usize {
        match *self {
            ModelShape::Slab { depth } => depth,
            ModelShape::Volumetric { tile_depth, .. } => tile_depth,
        }
    }

    pub fn depth_tokens(&self) -> usize {
        match *self {
            ModelShape::Slab { .. } => 1,
            ModelShape::Volumetric {
                tile_depth,
                patch_depth,
            } => tile_depth / patch_depth,
        }
    }

    /// Slices the model predicts at once.
    pub fn output_depth(&self) -> usize {
        match *self {
            ModelShape::Slab { .. } => 1,
            ModelShape::Volumetric { tile_depth, .. } => tile_depth,
        }
    }
}

/// Everything needed to rebuild the model (weights aside).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SegConfig {
    /// The kept encoder: `depth` = blocks kept, `grid` = in-plane token
    /// grid, `in_chans` = input channels.
    pub vit: VitConfig,
    pub shape: ModelShape,
    pub classes: usize,
    /// Decoder width at full resolution; doubles at each coarser level.
    pub features: usize,
    /// 1-based indices of the blocks whose outputs feed the decoder, shallow
    /// to deep; the last is the last kept block.
    pub taps: Vec<usize>,
    /// In-plane upsampling factor of each decoder level, coarse to fine;
    /// their product is the patch size.
    pub factors_hw: Vec<usize>,
    /// Depth upsampling factor of each decoder level; product = patch depth
    /// for volumetric models, all 1 for slabs.
    pub factors_d: Vec<usize>,
    /// How the encoder was initialised (recorded for model cards).
    pub init: Init,
    /// Name of the source 2D model.
    pub source: String,
}

impl SegConfig {
    /// In-plane tile size.
    pub fn roi_hw(&self) -> [usize; 2] {
        [
            self.vit.grid[0] * self.vit.patch,
            self.vit.grid[1] * self.vit.patch,
        ]
    }

    pub fn in_channels(&self) -> usize {
        self.vit.in_chans
    }

    /// Model input in core layout: slab `[C, D, X, Y]`, volumetric
    /// `[C, X, Y, Z]` (batch excluded).
    pub fn input_item_shape(&self) -> Vec<usize> {
        let [h, w] = self.roi_hw();
        match self.shape {
            ModelShape::Slab { depth } => vec![self.in_channels(), depth, h, w],
            ModelShape::Volumetric { tile_depth, .. } => {
                vec![self.in_channels(), h, w, tile_depth]
            }
        }
    }

    /// Model output in core layout: slab `[K, 1, X, Y]`, volumetric
    /// `[K, X, Y, Z]`.
    pub fn output_item_shape(&self) -> Vec<usize> {
        let [h, w] = self.roi_hw();
        match self.shape {
            ModelShape::Slab { .. } => vec![self.classes, 1, h, w],
            ModelShape::Volumetric { tile_depth, .. } => vec![self.classes, h, w, tile_depth],
        }
    }

    /// Checks the numbers fit together; the message says which do not.
    pub fn validate(&self) -> Result<(), String> {
        let v = &self.vit;
        if v.depth == 0 || v.width == 0 || v.heads == 0 || !v.width.is_multiple_of(v.heads) {
            return Err(format!(
                "width {} must be a positive multiple of heads {}",
                v.width, v.heads
            ));
        }
        if self.classes < 2 {
            return Err(format!("need at least 2 classes, got {}", self.classes));
        }
        if self.features == 0 {
            return Err("decoder features must be positive".into());
        }
        match self.shape {
            ModelShape::Slab { depth: 0 } => {
                return Err("slab depth must be at least 1".into());
            }
            ModelShape::Volumetric {
                tile_depth,
                patch_depth,
            } if patch_depth == 0 || tile_depth == 0 || !tile_depth.is_multiple_of(patch_depth) => {
                return Err(format!(
                    "tile depth {tile_depth} must be a positive multiple of patch depth {patch_depth}"
                ));
            }
            _ => {}
        }
        if self.taps.is_empty()
            || self.taps.windows(2).any(|w| w[0] >= w[1])
            || self.taps[0] == 0
            || *self.taps.last().unwrap_or(&0) != v.depth
        {
            return Err(format!(
                "taps {:?} must be increasing block numbers ending at the last kept block {}",
                self.taps, v.depth
            ));
        }
        let levels = self.taps.len();
        if self.factors_hw.len() != levels || self.factors_d.len() != levels {
            return Err(format!(
                "{levels} taps need {levels} upsampling levels, got {:?} in-plane and {:?} in depth",
                self.factors_hw, self.factors_d
            ));
        }
        if self.factors_hw.iter().product::<usize>() != v.patch {
            return Err(format!(
                "in-plane factors {:?} must multiply to the patch size {}",
                self.factors_hw, v.patch
            ));
        }
        let want_d = match self.shape {
            ModelShape::Slab { .. } => 1,
            ModelShape::Volumetric { patch_depth, .. } => patch_depth,
        };
        if self.factors_d.iter().product::<usize>() != want_d {
            return Err(format!(
                "depth factors {:?} must multiply to {want_d}",
                self.factors_d
            ));
        }
        Ok(())
    }
}

/// Decoder levels for a patch size: its prime factors, largest first (16:
/// 2,2,2,2 as UNETR; 14: 7,2).
pub fn default_factors(patch: usize) -> Vec<usize> {
    let mut f = Vec::new();
    let mut n = patch;
    let mut p = 2;
    while n > 1 {
        while n.is_multiple_of(p) {
            f.push(p);
            n /= p;
        }
        p += 1;
    }
    f.sort_unstable_by(|a, b| b.cmp(a));
    if f.is_empty() {
        f.push(1);
    }
    f
}

/// Spreads a depth patch over `levels` decoder levels: its prime factors,
/// the largest at the finest levels, 1 where nothing is left.
pub fn depth_factors(patch_depth: usize, levels: usize) -> Vec<usize> {
    let mut out = vec![1; levels];
    let mut primes = default_factors(patch_depth);
    primes.retain(|&p| p > 1);
    // Fill from the finest level; surplus primes multiply into the finest.
    for (i, p) in primes.into_iter().enumerate() {
        let slot = levels - 1 - (i % levels);
        out[slot] *= p;
    }
    out
}

/// Blocks tapped by the decoder: `levels` evenly spaced, ending at `kept`
/// (12 blocks, 4 levels: 3, 6, 9, 12).
pub fn default_taps(kept: usize, levels: usize) -> Vec<usize> {
    let levels = levels.min(kept).max(1);
    let mut taps: Vec<usize> = (1..=levels).map(|i| (i * kept).div_ceil(levels)).collect();
    taps.dedup();
    taps
}

impl SegConfig {
    /// A consistent configuration: UNETR-style levels from the patch size
    /// (merged when fewer blocks are kept than there are levels), taps
    /// evenly spaced over the kept blocks.
    pub fn derive(
        vit: VitConfig,
        shape: ModelShape,
        classes: usize,
        features: usize,
        init: Init,
        source: String,
    ) -> Result<SegConfig, String> {
        let mut factors_hw = default_factors(vit.patch);
        while factors_hw.len() > vit.depth.max(1) {
            let a = factors_hw.remove(0);
            factors_hw[0] *= a;
        }
        let levels = factors_hw.len();
        let taps = default_taps(vit.depth, levels);
        let factors_d = match shape {
            ModelShape::Slab { .. } => vec![1; levels],
            ModelShape::Volumetric { patch_depth, .. } => depth_factors(patch_depth, levels),
        };
        let cfg = SegConfig {
            vit,
            shape,
            classes,
            features,
            taps,
            factors_hw,
            factors_d,
            init,
            source,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors() {
        assert_eq!(default_factors(16), vec![2, 2, 2, 2]);
        assert_eq!(default_factors(14), vec![7, 2]);
        assert_eq!(depth_factors(4, 2), vec![2, 2]);
        assert_eq!(depth_factors(2, 2), vec![1, 2]);
        assert_eq!(depth_factors(1, 3), vec![1, 1, 1]);
        assert_eq!(depth_factors(8, 2), vec![2, 4]);
        assert_eq!(default_taps(12, 4), vec![3, 6, 9, 12]);
        assert_eq!(default_taps(4, 2), vec![2, 4]);
        assert_eq!(default_taps(1, 2), vec![1]);
    }
}
