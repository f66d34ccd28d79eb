//! Training windows: slabs or 3D tiles cut from preprocessed volumes, with
//! foreground oversampling and augmentation, in the runtime's layouts
//! (slab `[C, D, X, Y]` with target `[K, 1, X, Y]`; tile `[C, X, Y, Z]` with
//! target `[K, X, Y, Z]`).
//!
//! Augmentation is one in-plane resampling per window: random zoom (crop
//! scale), a small rotation, flips and rot90 compose into one affine map
//! from output to source pixels, so images are interpolated once (bilinear) and labels taken by
//! nearest neighbour. Slices are never interpolated: the slab's geometry is
//! what the model sees at inference. Out-of-volume pixels are 0 in the image
//! (the runtime's pad value) and background in the label. The intensity
//! augmentations (gamma, scale and shift, a smooth multiplicative bias
//! field, Gaussian noise) mimic what separates one scanner's T1 from
//! another's.
//!
//! Where windows are centred is chosen against the brain-mask model's
//! failures on clinical scans: besides brain voxels (`fg_prob`) and
//! anywhere, the lowest and highest quarter of the head (skull base and
//! neck, vertex) with `edge_prob`; and a field of view cut short at the top
//! or bottom (`fov_cut_mm`), as a clinical scan that ends inside the
//! cerebellum is, turns the cut-off slices into padding.

use ndarray::{Array3, Array4};
use serde::{Deserialize, Serialize};

use crate::model::ModelShape;

/// SplitMix64 ([`infl8_core::rng`]): its whole state is one u64, so a
/// resumed run continues the exact same stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rng {
    pub state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng {
            state: seed ^ 0x5851_F42D_4C95_7F2D,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        infl8_core::rng::splitmix64(&mut self.state)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }

    /// Standard normal (Box-Muller; one draw of the pair is dropped so the
    /// whole state stays one u64).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Augment {
    pub flip: bool,
    /// In-plane quarter turns (square windows only).
    pub rot90: bool,
    /// Intensity `x * s + b`, s in `1 ± scale`, b in `± shift`.
    pub intensity_scale: f64,
    pub intensity_shift: f64,
    /// Crop scale range: the window covers `roi * z` source pixels.
    pub zoom: [f64; 2],
    /// Largest in-plane rotation, degrees (uniform in `± rotate`).
    pub rotate: f64,
    /// Bias field: intensities times `exp(gx u + gy v)` over the window
    /// (u, v in `[-0.5, 0.5]`), gx and gy uniform in `± bias_field`.
    pub bias_field: f64,
    /// Additive Gaussian noise, sd uniform in `[0, noise]` per window.
    pub noise: f64,
    /// Gamma remapping of each window's intensities within the case's
    /// range: `lo + (hi - lo) t^g`, `ln g` uniform in `± gamma`.
    pub gamma: f64,
    /// Half the windows see the field of view cut short: up to this many
    /// mm of slices (along z, inferior-superior after reorientation) off
    /// the top or the bottom become padding.
    pub fov_cut_mm: f64,
}

impl Default for Augment {
    fn default() -> Self {
        Augment {
            flip: true,
            rot90: true,
            intensity_scale: 0.1,
            intensity_shift: 0.1,
            zoom: [0.85, 1.15],
            rotate: 0.0,
            bias_field: 0.0,
            noise: 0.0,
            gamma: 0.0,
            fov_cut_mm: 0.0,
        }
    }
}

impl Augment {
    pub fn none() -> Augment {
        Augment {
            flip: false,
            rot90: false,
            intensity_scale: 0.0,
            intensity_shift: 0.0,
            zoom: [1.0, 1.0],
            rotate: 0.0,
            bias_field: 0.0,
            noise: 0.0,
            gamma: 0.0,
            fov_cut_mm: 0.0,
        }
    }
}

/// A preprocessed training volume with its foreground index.
pub struct TrainCase {
    pub id: String,
    /// `[C, X, Y, Z]`.
    pub image: Array4<f32>,
    /// `[X, Y, Z]`.
    pub label: Array3<u8>,
    /// Flat indices of foreground voxels (subsampled), for oversampling.
    fg: Vec<usize>,
    /// First and last slice (z) holding head: a voxel brighter than the
    /// volume's mean.
    head_z: (usize, usize),
    /// Intensity range of each channel, for the gamma remapping.
    range: Vec<(f32, f32)>,
}

impl TrainCase {
    pub fn new(id: String, image: Array4<f32>, label: Array3<u8>) -> TrainCase {
        let label = label.as_standard_layout().into_owned();
        let all: Vec<usize> = label
            .iter()
            .enumerate()
            .filter(|(_, v)| **v > 0)
            .map(|(i, _)| i)
            .collect();
        // Every 7th voxel is plenty to pick centres from and keeps memory low.
        let fg = all.into_iter().step_by(7).collect();
        let image = image.as_standard_layout().into_owned();
        let range = image
            .outer_iter()
            .map(|ch| {
                ch.iter()
                    .filter(|v| v.is_finite())
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                        (lo.min(v), hi.max(v))
                    })
            })
            .collect();
        let head_z = head_slices(&image);
        TrainCase {
            id,
            image,
            label,
            fg,
            head_z,
            range,
        }
    }
}

/// What to cut.
#[derive(Clone, Debug)]
pub struct Sampler {
    pub shape: ModelShape,
    /// In-plane window.
    pub roi: [usize; 2],
    pub classes: usize,
    /// Probability that a window is centred on a foreground voxel.
    pub fg_prob: f64,
    /// Probability that a window is centred in the lowest or the highest
    /// quarter of the head's slices (skull base and neck, vertex).
    pub edge_prob: f64,
    /// Slice thickness of the preprocessed cases, mm (for `fov_cut_mm`).
    pub slice_mm: f64,
    pub augment: Augment,
}

/// A window and its one-hot target, flat, in the runtime's layouts.
pub struct Sample {
    pub x: Vec<f32>,
    pub y: Vec<f32>,
}

impl Sampler {
    pub fn input_len(&self, channels: usize) -> usize {
        channels * self.shape.input_depth() * self.roi[0] * self.roi[1]
    }

    pub fn target_len(&self) -> usize {
        self.classes * self.shape.output_depth() * self.roi[0] * self.roi[1]
    }

    pub fn sample(&self, case: &TrainCase, rng: &mut Rng) -> Sample {
        let (c, nx, ny, nz) = case.image.dim();
        let [rx, ry] = self.roi;
        let out_d = self.shape.output_depth();
        let a = &self.augment;
        // The slices this window's scan has, `z_lo..z_hi`. Every draw is
        // made only when its feature is on, so configurations without it
        // keep their random stream (and their results).
        let (z_lo, z_hi) = if a.fov_cut_mm > 0.0 && rng.uniform() < 0.5 {
            let cut = (rng.range(0.0, a.fov_cut_mm) / self.slice_mm.max(1e-6)).round() as usize;
            let cut = cut.min(nz.saturating_sub(1));
            if rng.uniform() < 0.5 {
                (cut, nz)
            } else {
                (0, nz - cut)
            }
        } else {
            (0, nz)
        };
        // Centre voxel.
        let edge = self.edge_prob > 0.0 && rng.uniform() < self.edge_prob;
        let (cx, cy, cz) = if edge {
            let (lo, hi) = case.head_z;
            let band = ((hi - lo + 1) / 4).max(1);
            let z = if rng.uniform() < 0.5 {
                lo + rng.below(band)
            } else {
                hi + 1 - band + rng.below(band)
            };
            (rng.below(nx), rng.below(ny), z)
        } else if !case.fg.is_empty() && rng.uniform() < self.fg_prob {
            let i = case.fg[rng.below(case.fg.len())];
            (i / (ny * nz), (i / nz) % ny, i % nz)
        } else {
            (rng.below(nx), rng.below(ny), rng.below(nz))
        };
        // A centre in the cut-off part moves to the nearest slice kept.
        let cz = cz.clamp(z_lo, z_hi - 1);
        let gamma = if a.gamma > 0.0 {
            rng.range(-a.gamma, a.gamma).exp()
        } else {
            1.0
        };
        let zoom = if a.zoom[1] > a.zoom[0] {
            rng.range(a.zoom[0], a.zoom[1])
        } else {
            a.zoom[0]
        };
        let flip_x = a.flip && rng.uniform() < 0.5;
        let flip_y = a.flip && rng.uniform() < 0.5;
        let turns = if a.rot90 && rx == ry { rng.below(4) } else { 0 };
        let scale = 1.0
            + if a.intensity_scale > 0.0 {
                rng.range(-a.intensity_scale, a.intensity_scale)
            } else {
                0.0
            };
        let shift = if a.intensity_shift > 0.0 {
            rng.range(-a.intensity_shift, a.intensity_shift)
        } else {
            0.0
        };
        // Drawn only when enabled, so configs without them keep their
        // random stream (and their results) unchanged.
        let angle = if a.rotate > 0.0 {
            rng.range(-a.rotate, a.rotate).to_radians()
        } else {
            0.0
        };
        let (sin, cos) = angle.sin_cos();
        let (gx, gy) = if a.bias_field > 0.0 {
            (
                rng.range(-a.bias_field, a.bias_field),
                rng.range(-a.bias_field, a.bias_field),
            )
        } else {
            (0.0, 0.0)
        };
        let noise_sd = if a.noise > 0.0 {
            rng.range(0.0, a.noise)
        } else {
            0.0
        };

        // Output pixel (i, j) -> source (sx, sy): centre, rotate, flip, zoom.
        let map = |i: usize, j: usize| -> (f64, f64) {
            let mut u = i as f64 + 0.5 - rx as f64 / 2.0;
            let mut v = j as f64 + 0.5 - ry as f64 / 2.0;
            if angle != 0.0 {
                (u, v) = (u * cos - v * sin, u * sin + v * cos);
            }
            for _ in 0..turns {
                (u, v) = (-v, u);
            }
            if flip_x {
                u = -u;
            }
            if flip_y {
                v = -v;
            }
            // The window's centre sits on a voxel centre for odd sizes and
            // between two voxels for even ones, so that without zoom every
            // output pixel lands exactly on a source voxel (no blur).
            let centre =
                |c: usize, r: usize| c as f64 - if r.is_multiple_of(2) { 0.5 } else { 0.0 };
            (centre(cx, rx) + u * zoom, centre(cy, ry) + v * zoom)
        };

        // Slices fed to the model and slices predicted.
        let (in_slices, out_slices): (Vec<i64>, Vec<i64>) = match self.shape {
            ModelShape::Slab { depth } => {
                let z0 = cz as i64 - (depth / 2) as i64;
                // Beyond the scan's ends the runtime repeats the end slice;
                // a cut field of view ends the scan earlier.
                let ins = (0..depth as i64)
                    .map(|d| (z0 + d).clamp(z_lo as i64, z_hi as i64 - 1))
                    .collect();
                (ins, vec![cz as i64])
            }
            ModelShape::Volumetric { tile_depth, .. } => {
                let z0 = cz as i64 - (tile_depth / 2) as i64;
                let zs: Vec<i64> = (0..tile_depth as i64).map(|d| z0 + d).collect();
                (zs.clone(), zs)
            }
        };

        let in_d = in_slices.len();
        let mut x = vec![0f32; c * in_d * rx * ry];
        let mut y = vec![0f32; self.classes * out_d * rx * ry];
        let slab = matches!(self.shape, ModelShape::Slab { .. });
        for i in 0..rx {
            for j in 0..ry {
                let (sx, sy) = map(i, j);
                let bias = if gx != 0.0 || gy != 0.0 {
                    (gx * ((i as f64 + 0.5) / rx as f64 - 0.5)
                        + gy * ((j as f64 + 0.5) / ry as f64 - 0.5))
                        .exp()
                } else {
                    1.0
                };
                for (d, &z) in in_slices.iter().enumerate() {
                    if z < z_lo as i64 || z >= z_hi as i64 {
                        continue;
                    }
                    for ch in 0..c {
                        let v = bilinear(&case.image, ch, sx, sy, z as usize);
                        let v = if gamma != 1.0 {
                            remap_gamma(v, case.range[ch], gamma)
                        } else {
                            f64::from(v)
                        };
                        let mut v = (v * scale + shift) * bias;
                        if noise_sd > 0.0 {
                            v += noise_sd * rng.normal();
                        }
                        let v = v as f32;
                        let idx = if slab {
                            ((ch * in_d + d) * rx + i) * ry + j
                        } else {
                            ((ch * rx + i) * ry + j) * in_d + d
                        };
                        x[idx] = v;
                    }
                }
                for (d, &z) in out_slices.iter().enumerate() {
                    let lab = if z < z_lo as i64 || z >= z_hi as i64 {
                        0
                    } else {
                        nearest(&case.label, sx, sy, z as usize)
                    };
                    let k = usize::from(lab).min(self.classes - 1);
                    let idx = if slab {
                        (k * rx + i) * ry + j
                    } else {
                        ((k * rx + i) * ry + j) * out_d + d
                    };
                    y[idx] = 1.0;
                }
            }
        }
        Sample { x, y }
    }
}

/// `v` gamma-remapped within `(lo, hi)`: the ends stay, the order stays.
fn remap_gamma(v: f32, (lo, hi): (f32, f32), gamma: f64) -> f64 {
    let (lo, hi) = (f64::from(lo), f64::from(hi));
    if hi <= lo || !v.is_finite() {
        return f64::from(v);
    }
    let t = ((f64::from(v) - lo) / (hi - lo)).clamp(0.0, 1.0);
    lo + (hi - lo) * t.powf(gamma)
}

/// First and last slice (z) of the head: slices where at least 1% of the
/// voxels are brighter than the volume's mean (air is darker).
fn head_slices(image: &Array4<f32>) -> (usize, usize) {
    let (_, nx, ny, nz) = image.dim();
    let n = image.len().max(1) as f64;
    let mean = image.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let need = (nx * ny) / 100;
    let has_head = |z: usize| {
        image
            .slice(ndarray::s![.., .., .., z])
            .iter()
            .filter(|&&v| f64::from(v) > mean)
            .count()
            > need
    };
    let lo = (0..nz).find(|&z| has_head(z)).unwrap_or(0);
    let hi = (0..nz)
        .rev()
        .find(|&z| has_head(z))
        .unwrap_or(nz.saturating_sub(1));
    (lo, hi.max(lo))
}

fn bilinear(img: &Array4<f32>, ch: usize, x: f64, y: f64, z: usize) -> f32 {
    let (_, nx, ny, _) = img.dim();
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = (x - x0, y - y0);
    let mut acc = 0.0f64;
    for (dx, wx) in [(0i64, 1.0 - fx), (1, fx)] {
        for (dy, wy) in [(0i64, 1.0 - fy), (1, fy)] {
            let (xi, yi) = (x0 as i64 + dx, y0 as i64 + dy);
            if xi >= 0 && yi >= 0 && (xi as usize) < nx && (yi as usize) < ny {
                acc += wx * wy * f64::from(img[[ch, xi as usize, yi as usize, z]]);
            }
        }
    }
    acc as f32
}

fn nearest(label: &Array3<u8>, x: f64, y: f64, z: usize) -> u8 {
    let (nx, ny, _) = label.dim();
    let (xi, yi) = (x.round(), y.round());
    if xi < 0.0 || yi < 0.0 || xi as usize >= nx || yi as usize >= ny {
        0
    } else {
        label[[xi as usize, yi as usize, z]]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case() -> TrainCase {
        // Image = x + 100 y + 10000 z; label 1 where x >= 8.
        let image = Array4::from_shape_fn((1, 16, 12, 6), |(_, x, y, z)| {
            (x + 100 * y + 10000 * z) as f32
        });
        let label = Array3::from_shape_fn((16, 12, 6), |(x, _, _)| u8::from(x >= 8));
        TrainCase::new("c".into(), image, label)
    }

    fn sampler(shape: ModelShape) -> Sampler {
        Sampler {
            shape,
            roi: [4, 4],
            classes: 2,
            fg_prob: 0.0,
            edge_prob: 0.0,
            slice_mm: 1.0,
            augment: Augment::none(),
        }
    }

    #[test]
    fn slab_windows_are_exact_crops_without_augmentation() {
        let s = sampler(ModelShape::Slab { depth: 3 });
        let c = case();
        let mut rng = Rng::new(1);
        for _ in 0..50 {
            let smp = s.sample(&c, &mut rng);
            assert_eq!(smp.x.len(), s.input_len(1));
            assert_eq!(smp.y.len(), s.target_len());
            // One-hot.
            for p in 0..16 {
                assert_eq!(smp.y[p] + smp.y[16 + p], 1.0);
            }
            // Middle slice pixel (0,0) decodes to a voxel whose label
            // matches the target where inside the volume.
            let v = smp.x[16] as i64; // d = 1, i = 0, j = 0
            if v > 0 {
                let x = v % 100;
                assert_eq!(smp.y[16] == 1.0, x >= 8, "value {v}");
            }
        }
    }

    #[test]
    fn foreground_oversampling_finds_foreground() {
        let mut s = sampler(ModelShape::Slab { depth: 1 });
        s.fg_prob = 1.0;
        let c = case();
        let mut rng = Rng::new(2);
        for _ in 0..20 {
            let smp = s.sample(&c, &mut rng);
            assert!(smp.y[16..].contains(&1.0));
        }
    }

    #[test]
    fn augmented_targets_stay_aligned_with_images() {
        let mut s = sampler(ModelShape::Volumetric {
            tile_depth: 2,
            patch_depth: 1,
        });
        s.augment = Augment {
            intensity_scale: 0.0,
            intensity_shift: 0.0,
            zoom: [1.0, 1.0],
            ..Augment::default()
        };
        let c = case();
        let mut rng = Rng::new(3);
        for _ in 0..50 {
            let smp = s.sample(&c, &mut rng);
            for p in 0..(4 * 4 * 2) {
                let v = smp.x[p] as i64;
                if v > 0 {
                    assert_eq!(smp.y[32 + p] == 1.0, v % 100 >= 8, "pixel {p} value {v}");
                }
            }
        }
    }

    #[test]
    fn rotated_and_noisy_windows_keep_labels_on_their_structures() {
        // A half-plane x >= 8 of intensity 1 and label 1.
        let image = Array4::from_shape_fn((1, 16, 12, 6), |(_, x, _, _)| f32::from(x >= 8));
        let label = Array3::from_shape_fn((16, 12, 6), |(x, _, _)| u8::from(x >= 8));
        let c = TrainCase::new("half".into(), image, label);
        let mut s = sampler(ModelShape::Slab { depth: 1 });
        s.roi = [8, 8];
        s.augment = Augment {
            rotate: 30.0,
            noise: 0.05,
            bias_field: 0.2,
            ..Augment::none()
        };
        let mut rng = Rng::new(5);
        let (mut agree, mut total, mut tilted) = (0, 0, 0);
        for _ in 0..100 {
            let smp = s.sample(&c, &mut rng);
            for p in 0..64 {
                let fg = smp.y[64 + p] == 1.0;
                total += 1;
                agree += usize::from((smp.x[p] > 0.5) == fg);
            }
            // A rotated edge crosses window rows at different columns.
            let edge = |row: usize| (0..8).find(|&j| smp.y[64 + row * 8 + j] == 1.0);
            tilted += usize::from(edge(0) != edge(7));
        }
        assert!(agree as f64 / total as f64 > 0.97, "{agree}/{total}");
        assert!(tilted > 0, "no window was rotated");
    }

    /// A head in slices 4..=19 of 24 (air above and below).
    fn head_case() -> TrainCase {
        let image = Array4::from_shape_fn((1, 8, 8, 24), |(_, _, _, z)| {
            if (4..20).contains(&z) {
                100.0 + z as f32
            } else {
                0.0
            }
        });
        let label = Array3::from_shape_fn((8, 8, 24), |(_, _, z)| u8::from((8..16).contains(&z)));
        TrainCase::new("head".into(), image, label)
    }

    #[test]
    fn edge_sampling_centres_windows_on_the_head_s_lowest_and_highest_quarters() {
        let c = head_case();
        assert_eq!(c.head_z, (4, 19));
        let mut s = sampler(ModelShape::Slab { depth: 1 });
        s.edge_prob = 1.0;
        let mut rng = Rng::new(4);
        let (mut low, mut high) = (0, 0);
        for _ in 0..200 {
            let smp = s.sample(&c, &mut rng);
            // The image holds 100 + z at every pixel of the slice (pixels
            // beyond the image's sides are 0).
            let top = smp.x.iter().cloned().fold(0.0f32, f32::max);
            let z = (top - 100.0).round() as i64;
            assert!((4..8).contains(&z) || (16..20).contains(&z), "slice {z}");
            if z < 8 {
                low += 1;
            } else {
                high += 1;
            }
        }
        assert!(low > 60 && high > 60, "low {low} high {high}");
    }

    #[test]
    fn a_cut_field_of_view_pads_the_cut_slices_and_keeps_centres_inside() {
        let c = head_case();
        // A tile twice the volume's depth always covers all of it.
        let mut s = sampler(ModelShape::Volumetric {
            tile_depth: 48,
            patch_depth: 1,
        });
        s.slice_mm = 2.0;
        s.augment.fov_cut_mm = 20.0;
        let mut rng = Rng::new(6);
        let mut cut_seen = 0;
        for _ in 0..200 {
            let smp = s.sample(&c, &mut rng);
            // Tile [C, X, Y, Z] of 4 x 4 x 48, Z fastest: the brightest
            // pixel of each slice (pixels beyond the image's sides are 0).
            let column: Vec<f32> = (0..48)
                .map(|d| (0..16).map(|p| smp.x[p * 48 + d]).fold(0.0f32, f32::max))
                .collect();
            let present = column.iter().filter(|&&v| v > 0.0).count();
            // Never more than 10 slices (20 mm at 2 mm) off the 16 of the head.
            assert!(present >= 10, "{column:?}");
            cut_seen += usize::from(present < 16);
            // Padding is background in the target too (class 0 comes first).
            for (d, &v) in column.iter().enumerate() {
                if v == 0.0 {
                    assert!((0..16).all(|p| smp.y[p * 48 + d] == 1.0), "slice {d}");
                }
            }
        }
        assert!(cut_seen > 20, "{cut_seen}");
    }

    #[test]
    fn gamma_keeps_the_range_ends_and_the_order() {
        for g in [0.5, 1.0, 2.0] {
            assert_eq!(remap_gamma(0.0, (0.0, 10.0), g), 0.0);
            assert_eq!(remap_gamma(10.0, (0.0, 10.0), g), 10.0);
            assert!(remap_gamma(3.0, (0.0, 10.0), g) < remap_gamma(4.0, (0.0, 10.0), g));
        }
        assert!(remap_gamma(5.0, (0.0, 10.0), 2.0) < 5.0);
        assert!(remap_gamma(5.0, (0.0, 10.0), 0.5) > 5.0);
    }

    #[test]
    fn normal_draws_have_unit_variance() {
        let mut rng = Rng::new(11);
        let v: Vec<f64> = (0..20_000).map(|_| rng.normal()).collect();
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(
            m.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "mean {m} var {var}"
        );
    }

    #[test]
    fn rng_is_reproducible() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        assert!((0..10).all(|_| a.next_u64() == b.next_u64()));
    }
}
