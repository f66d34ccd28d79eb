//! Acquisition degradations of a scan and its label map: bias field,
//! Rician noise, thick slices, storage orientation, field-of-view cut and
//! resampling to another grid. One implementation for the peer benchmark
//! (`infl8-train degrade`, scripts/bench-brain.sh) and for training
//! augmentation.
//!
//! Every function is pure: a volume (and its labels on the same grid) in,
//! new volumes out, with the affine rewritten so that a voxel's world
//! position (RAS mm) is exact wherever the geometry changes. Randomness
//! comes from `infl8_core::rng::splitmix64` with an explicit seed.

use infl8_core::rng::splitmix64;
use infl8_core::volume::Volume;
use nalgebra::{Matrix4, Rotation3, Vector3, Vector4};
use ndarray::{Array3, Array4, ArrayView3, Axis, Zip};

#[derive(Debug, thiserror::Error)]
pub enum DegradeError {
    #[error("the label map has dims {label:?} but the image has {image:?}: they must share a grid")]
    GridMismatch {
        image: [usize; 3],
        label: [usize; 3],
    },
    #[error("invalid degradation parameter: {0}")]
    Param(String),
    #[error("the label map has no foreground voxel, so {0} is undefined")]
    NoForeground(&'static str),
    #[error("the cut at z = {z_mm} mm keeps no slice (the scan spans z {lo:.1}..{hi:.1} mm)")]
    EmptyCut { z_mm: f64, lo: f64, hi: f64 },
}

/// A scan and its label map on one grid (labels as integer-valued f32).
#[derive(Clone, Debug)]
pub struct Pair {
    pub image: Volume,
    pub label: Volume,
}

impl Pair {
    pub fn new(image: Volume, label: Volume) -> Result<Self, DegradeError> {
        if image.dims() != label.dims() {
            return Err(DegradeError::GridMismatch {
                image: image.dims(),
                label: label.dims(),
            });
        }
        Ok(Pair { image, label })
    }

    /// Both volumes with new data on a new grid; the source headers are
    /// dropped because they no longer describe it.
    fn regrid(image: Array4<f32>, label: Array4<f32>, affine: Matrix4<f64>) -> Pair {
        Pair {
            image: Volume::new(image, affine),
            label: Volume::new(label, affine),
        }
    }
}

/// A uniform number in [0, 1) from the stream.
fn uniform(state: &mut u64) -> f64 {
    (splitmix64(state) >> 11) as f64 / (1u64 << 53) as f64
}

/// A standard normal number (Box-Muller).
fn normal(state: &mut u64) -> f64 {
    let u = 1.0 - uniform(state); // (0, 1]: log is finite
    let v = uniform(state);
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

fn positive(name: &str, v: f64) -> Result<f64, DegradeError> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(DegradeError::Param(format!(
            "{name} must be a finite number > 0, got {v}"
        )))
    }
}

// ------------------------------------------------------------ intensity

/// Highest total degree of the bias field's polynomial: a field that
/// varies slowly across the head, as a receive coil's does.
pub const BIAS_DEGREE: usize = 3;

/// A smooth multiplicative bias field on a grid of `dims`:
/// `exp(ln(1 + a) * p(u, v, w))` where `p` is a random polynomial of total
/// degree 1..=[`BIAS_DEGREE`] in the voxel coordinates scaled to [-1, 1],
/// normalised so that max |p| over the grid is 1. Every multiplier lies in
/// `[1 / (1 + a), 1 + a]` and both ends are reached.
pub fn bias_field(dims: [usize; 3], a: f64, seed: u64) -> Result<Array3<f32>, DegradeError> {
    let a = positive("the bias strength", a)?;
    let mut state = seed;
    let mut terms = Vec::new();
    for i in 0..=BIAS_DEGREE {
        for j in 0..=BIAS_DEGREE - i {
            for k in 0..=BIAS_DEGREE - i - j {
                if i + j + k > 0 {
                    // Higher orders weigh less: the field stays low-frequency.
                    let c = (2.0 * uniform(&mut state) - 1.0) / (i + j + k) as f64;
                    terms.push(([i as i32, j as i32, k as i32], c));
                }
            }
        }
    }
    let unit = |n: usize, x: usize| {
        if n > 1 {
            2.0 * x as f64 / (n - 1) as f64 - 1.0
        } else {
            0.0
        }
    };
    let p = Array3::from_shape_fn(dims, |(x, y, z)| {
        let u = [unit(dims[0], x), unit(dims[1], y), unit(dims[2], z)];
        terms
            .iter()
            .map(|(e, c)| c * u[0].powi(e[0]) * u[1].powi(e[1]) * u[2].powi(e[2]))
            .sum::<f64>()
    });
    let peak = p.iter().fold(0f64, |m, v| m.max(v.abs()));
    let scale = (1.0 + a).ln() / if peak > 0.0 { peak } else { 1.0 };
    Ok(p.mapv(|v| (v * scale).exp() as f32))
}

/// Median intensity of the image over the label's foreground: the scale
/// the noise level is a fraction of.
pub fn foreground_median(pair: &Pair) -> Result<f64, DegradeError> {
    let mut v: Vec<f32> = Zip::from(pair.image.data.index_axis(Axis(0), 0))
        .and(pair.label.data.index_axis(Axis(0), 0))
        .fold(Vec::new(), |mut acc, &x, &l| {
            if l != 0.0 {
                acc.push(x);
            }
            acc
        });
    if v.is_empty() {
        return Err(DegradeError::NoForeground("the noise level"));
    }
    let mid = v.len() / 2;
    let (_, m, _) = v.select_nth_unstable_by(mid, f32::total_cmp);
    Ok(f64::from(*m))
}

/// The image times a [`bias_field`] of strength `bias` (none when 0), then
/// Rician noise: `sqrt((x + n1)^2 + n2^2)` with `n1, n2 ~ N(0, s^2)` and
/// `s = noise * median intensity of the labelled foreground` (none when
/// `noise` is 0). Labels are unchanged.
pub fn bias_noise(pair: &Pair, bias: f64, noise: f64, seed: u64) -> Result<Pair, DegradeError> {
    if !(noise.is_finite() && noise >= 0.0) {
        return Err(DegradeError::Param(format!(
            "the noise level must be >= 0, got {noise}"
        )));
    }
    let mut out = pair.clone();
    if bias != 0.0 {
        let field = bias_field(pair.image.dims(), bias, seed)?;
        for mut c in out.image.data.outer_iter_mut() {
            c *= &field;
        }
    }
    if noise > 0.0 {
        let sigma = noise * foreground_median(pair)?;
        // A stream apart from the bias field's.
        let mut state = seed.wrapping_add(0x006E_6F69_7365); // "noise"
        out.image.data.mapv_inplace(|x| {
            let (n1, n2) = (normal(&mut state) * sigma, normal(&mut state) * sigma);
            ((f64::from(x) + n1).powi(2) + n2 * n2).sqrt() as f32
        });
    }
    Ok(out)
}

// ------------------------------------------------------------- geometry

/// Index `(i, j, k)` to world millimetres under `affine`.
pub fn world(affine: &Matrix4<f64>, idx: [f64; 3]) -> Vector3<f64> {
    (affine * Vector4::new(idx[0], idx[1], idx[2], 1.0)).xyz()
}

/// Full width at half maximum over standard deviation of a Gaussian.
const FWHM_PER_SIGMA: f64 = 2.354_820_045_030_949;

/// Gaussian blur along one axis (sigma in voxels), truncated at 3 sigma,
/// renormalised where the kernel leaves the grid so edges keep their level.
fn blur_axis(data: &mut Array4<f32>, axis: usize, sigma: f64) {
    let radius = (3.0 * sigma).ceil() as isize;
    let kernel: Vec<f64> = (-radius..=radius)
        .map(|d| (-0.5 * (d as f64 / sigma).powi(2)).exp())
        .collect();
    let mut buf = Vec::new();
    for mut lane in data.lanes_mut(Axis(axis + 1)) {
        buf.clear();
        buf.extend(lane.iter().map(|&v| f64::from(v)));
        let n = buf.len() as isize;
        for (q, dst) in lane.iter_mut().enumerate() {
            let (mut acc, mut w) = (0.0, 0.0);
            for (t, &kv) in kernel.iter().enumerate() {
                let p = q as isize + t as isize - radius;
                if (0..n).contains(&p) {
                    acc += kv * buf[p as usize];
                    w += kv;
                }
            }
            *dst = (acc / w) as f32;
        }
    }
}

/// Thick-slice acquisition along voxel axis `axis`: the image is blurred
/// along it with a Gaussian of FWHM = `thickness_mm` (minus nothing: the
/// source slices count as thin), then sampled every `thickness_mm`, so the
/// new spacing along the axis is exactly the thickness. Samples are
/// centred in the old extent; a sample between two old slices is
/// interpolated linearly. Labels take the old slice nearest each sample.
/// The affine maps each new slice to the exact world position it was
/// sampled at.
pub fn thick_slices(pair: &Pair, axis: usize, thickness_mm: f64) -> Result<Pair, DegradeError> {
    if axis > 2 {
        return Err(DegradeError::Param(format!("axis {axis} is not 0, 1 or 2")));
    }
    let thickness = positive("the slice thickness", thickness_mm)?;
    let spacing = pair.image.spacing[axis];
    let ratio = thickness / spacing;
    if ratio < 1.0 {
        return Err(DegradeError::Param(format!(
            "slice thickness {thickness} mm is below the spacing {spacing} mm of axis {axis}"
        )));
    }
    let n = pair.image.dims()[axis];
    let kept = ((n - 1) as f64 / ratio).floor() as usize + 1;
    let start = ((n - 1) as f64 - (kept - 1) as f64 * ratio) / 2.0;
    let mut blurred = pair.image.data.clone();
    blur_axis(&mut blurred, axis, ratio / FWHM_PER_SIGMA);

    let mut shape = blurred.raw_dim();
    shape[axis + 1] = kept;
    let mut image = Array4::zeros(shape);
    let mut label = Array4::zeros(shape);
    for m in 0..kept {
        let t = start + m as f64 * ratio;
        let lo = (t.floor() as usize).min(n - 1);
        let hi = (lo + 1).min(n - 1);
        let w = (t - lo as f64) as f32;
        let (a, b) = (
            blurred.index_axis(Axis(axis + 1), lo),
            blurred.index_axis(Axis(axis + 1), hi),
        );
        Zip::from(image.index_axis_mut(Axis(axis + 1), m))
            .and(&a)
            .and(&b)
            .for_each(|d, &x, &y| *d = x * (1.0 - w) + y * w);
        let nearest = (t.round() as usize).min(n - 1);
        label
            .index_axis_mut(Axis(axis + 1), m)
            .assign(&pair.label.data.index_axis(Axis(axis + 1), nearest));
    }
    // New index m along the axis is old index start + m * ratio.
    let mut step = Matrix4::identity();
    step[(axis, axis)] = ratio;
    step[(axis, 3)] = start;
    Ok(Pair::regrid(image, label, pair.image.affine * step))
}

/// A new storage order: new axis `a` is old axis `axes[a]`, reversed when
/// `flip[a]`. The affine is rewritten so every voxel keeps its world
/// position; only the order on disk changes.
pub fn reorient(pair: &Pair, axes: [usize; 3], flip: [bool; 3]) -> Result<Pair, DegradeError> {
    let mut seen = [false; 3];
    for &a in &axes {
        if a > 2 || std::mem::replace(&mut seen[a], true) {
            return Err(DegradeError::Param(format!(
                "axes {axes:?} is not a permutation of 0, 1, 2"
            )));
        }
    }
    let old = pair.image.dims();
    let apply = |data: &Array4<f32>| {
        let mut v = data
            .view()
            .permuted_axes([0, axes[0] + 1, axes[1] + 1, axes[2] + 1]);
        for (a, &f) in flip.iter().enumerate() {
            if f {
                v.invert_axis(Axis(a + 1));
            }
        }
        v.as_standard_layout().into_owned()
    };
    // Old index along axes[a] = new index a, or (n - 1) - new index a.
    let mut m = Matrix4::zeros();
    m[(3, 3)] = 1.0;
    for (a, (&o, &f)) in axes.iter().zip(&flip).enumerate() {
        if f {
            m[(o, a)] = -1.0;
            m[(o, 3)] = (old[o] - 1) as f64;
        } else {
            m[(o, a)] = 1.0;
        }
    }
    Ok(Pair::regrid(
        apply(&pair.image.data),
        apply(&pair.label.data),
        pair.image.affine * m,
    ))
}

/// The voxel axis closest to the world's inferior-superior direction.
fn vertical_axis(affine: &Matrix4<f64>) -> usize {
    (0..3)
        .max_by(|&a, &b| {
            let f = |c: usize| affine[(2, c)].abs() / affine.fixed_view::<3, 1>(0, c).norm();
            f(a).total_cmp(&f(b))
        })
        .unwrap_or(2)
}

/// World z (mm) of the lowest foreground voxel centre of the labels.
pub fn foreground_bottom_z(pair: &Pair) -> Result<f64, DegradeError> {
    pair.label
        .data
        .index_axis(Axis(0), 0)
        .indexed_iter()
        .filter(|(_, l)| **l != 0.0)
        .map(|((i, j, k), _)| world(&pair.label.affine, [i as f64, j as f64, k as f64]).z)
        .reduce(f64::min)
        .ok_or(DegradeError::NoForeground("the brain's bottom"))
}

/// A field of view that ends at world height `z_mm`: the slices (along the
/// voxel axis closest to inferior-superior) whose centre lies below it are
/// dropped, as a scan planned too high would miss them. The affine's
/// origin moves with the first kept slice, so world positions are exact.
pub fn fov_cut(pair: &Pair, z_mm: f64) -> Result<Pair, DegradeError> {
    if !z_mm.is_finite() {
        return Err(DegradeError::Param(format!("z {z_mm} is not finite")));
    }
    let axis = vertical_axis(&pair.image.affine);
    let dims = pair.image.dims();
    let mut centre = dims.map(|n| (n as f64 - 1.0) / 2.0);
    let slice_z = |k: usize, centre: &mut [f64; 3]| {
        centre[axis] = k as f64;
        world(&pair.image.affine, *centre).z
    };
    let kept: Vec<usize> = (0..dims[axis])
        .filter(|&k| slice_z(k, &mut centre) >= z_mm)
        .collect();
    let (Some(&lo), Some(&hi)) = (kept.first(), kept.last()) else {
        let (a, b) = (
            slice_z(0, &mut centre),
            slice_z(dims[axis] - 1, &mut centre),
        );
        return Err(DegradeError::EmptyCut {
            z_mm,
            lo: a.min(b),
            hi: a.max(b),
        });
    };
    let crop = |d: &Array4<f32>| {
        d.slice_axis(Axis(axis + 1), ndarray::Slice::from(lo..=hi))
            .to_owned()
    };
    let mut shift = Matrix4::identity();
    shift[(axis, 3)] = lo as f64;
    Ok(Pair::regrid(
        crop(&pair.image.data),
        crop(&pair.label.data),
        pair.image.affine * shift,
    ))
}

/// Trilinear sample of `data` at continuous index `p`; 0 outside the grid.
fn trilinear(data: ArrayView3<f32>, p: Vector3<f64>) -> f32 {
    let d = data.dim();
    let n = [d.0, d.1, d.2];
    let mut acc = 0.0f64;
    let base = [p.x.floor(), p.y.floor(), p.z.floor()];
    for corner in 0..8 {
        let mut w = 1.0;
        let mut idx = [0usize; 3];
        let mut inside = true;
        for (a, slot) in idx.iter_mut().enumerate() {
            let up = (corner >> a) & 1 == 1;
            let c = base[a] + f64::from(u8::from(up));
            let f = p[a] - base[a];
            w *= if up { f } else { 1.0 - f };
            inside &= (0.0..=(n[a] - 1) as f64).contains(&c);
            *slot = c.max(0.0) as usize;
        }
        if inside && w > 0.0 {
            acc += w * f64::from(data[idx]);
        }
    }
    acc as f32
}

/// Nearest-voxel sample of `data` at continuous index `p`; 0 outside.
fn nearest(data: ArrayView3<f32>, p: Vector3<f64>) -> f32 {
    let d = data.dim();
    let r = [p.x.round(), p.y.round(), p.z.round()];
    let n = [d.0, d.1, d.2];
    if (0..3).all(|a| (0.0..=(n[a] - 1) as f64).contains(&r[a])) {
        data[[r[0] as usize, r[1] as usize, r[2] as usize]]
    } else {
        0.0
    }
}

/// The pair resampled in world space onto the grid `(affine, dims)`:
/// trilinear for the image, nearest voxel for the labels, 0 outside the
/// source's field of view.
pub fn resample(pair: &Pair, affine: Matrix4<f64>, dims: [usize; 3]) -> Result<Pair, DegradeError> {
    if dims.contains(&0) {
        return Err(DegradeError::Param(format!(
            "target dims {dims:?} have a zero"
        )));
    }
    let inv = pair
        .image
        .affine
        .try_inverse()
        .ok_or_else(|| DegradeError::Param("the source affine is not invertible".into()))?;
    // Target index -> source index.
    let map = inv * affine;
    let shape = (pair.image.channels(), dims[0], dims[1], dims[2]);
    let src = |(i, j, k): (usize, usize, usize)| {
        (map * Vector4::new(i as f64, j as f64, k as f64, 1.0)).xyz()
    };
    let image = Array4::from_shape_fn(shape, |(c, i, j, k)| {
        trilinear(pair.image.data.index_axis(Axis(0), c), src((i, j, k)))
    });
    let label = Array4::from_shape_fn((1, dims[0], dims[1], dims[2]), |(_, i, j, k)| {
        nearest(pair.label.data.index_axis(Axis(0), 0), src((i, j, k)))
    });
    Ok(Pair::regrid(image, label, affine))
}

/// A grid of voxel size `spacing` whose axes are the source's axis
/// directions rotated by `rotate_deg` (about x, then y, then z of the
/// world), just large enough to hold the source's whole field of view.
pub fn rotated_grid(
    source: &Volume,
    spacing: [f64; 3],
    rotate_deg: [f64; 3],
) -> Result<(Matrix4<f64>, [usize; 3]), DegradeError> {
    for s in spacing {
        positive("a target spacing", s)?;
    }
    let r = rotate_deg.map(f64::to_radians);
    let rot = Rotation3::from_euler_angles(r[0], r[1], r[2]);
    let mut lin = source.affine.fixed_view::<3, 3>(0, 0).into_owned();
    for (c, &s) in spacing.iter().enumerate() {
        let col = lin.column(c).normalize() * s;
        lin.set_column(c, &(rot * col));
    }
    let inv = lin
        .try_inverse()
        .ok_or_else(|| DegradeError::Param("the source affine is degenerate".into()))?;
    let d = source.dims();
    let (mut lo, mut hi) = (
        Vector3::repeat(f64::INFINITY),
        Vector3::repeat(f64::NEG_INFINITY),
    );
    for corner in 0..8 {
        let idx = [0, 1, 2].map(|a| {
            if (corner >> a) & 1 == 1 {
                (d[a] - 1) as f64
            } else {
                0.0
            }
        });
        let p = inv * world(&source.affine, idx);
        lo = lo.inf(&p);
        hi = hi.sup(&p);
    }
    let dims = [0, 1, 2].map(|a| ((hi[a] - lo[a]).ceil() as usize + 1).max(1));
    let mut affine = Matrix4::identity();
    affine.fixed_view_mut::<3, 3>(0, 0).copy_from(&lin);
    affine.fixed_view_mut::<3, 1>(0, 3).copy_from(&(lin * lo));
    Ok((affine, dims))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_pair(dims: [usize; 3], affine: Matrix4<f64>) -> Pair {
        let image = Array4::from_shape_fn((1, dims[0], dims[1], dims[2]), |(_, i, j, k)| {
            (1 + i + 10 * j + 100 * k) as f32
        });
        let label = Array4::from_shape_fn((1, dims[0], dims[1], dims[2]), |(_, i, j, k)| {
            f32::from(u8::from(i > 1 && j > 1 && k > 1))
        });
        Pair::new(Volume::new(image, affine), Volume::new(label, affine)).unwrap()
    }

    fn oblique() -> Matrix4<f64> {
        let rot = Rotation3::from_euler_angles(0.2, -0.1, 0.3);
        let mut a = Matrix4::identity();
        let lin = rot.matrix() * nalgebra::Matrix3::from_diagonal(&Vector3::new(1.0, 1.2, 0.8));
        a.fixed_view_mut::<3, 3>(0, 0).copy_from(&lin);
        a.fixed_view_mut::<3, 1>(0, 3)
            .copy_from(&Vector3::new(-40.0, 12.5, -30.0));
        a
    }

    #[test]
    fn bias_field_is_smooth_and_within_its_range() {
        let dims = [48, 56, 40];
        for (seed, a) in [(1, 0.3), (7, 0.5), (42, 1.0)] {
            let f = bias_field(dims, a, seed).unwrap();
            let (lo, hi) = f
                .iter()
                .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            let (min, max) = ((1.0 / (1.0 + a)) as f32, (1.0 + a) as f32);
            assert!(
                lo >= min * (1.0 - 1e-6) && hi <= max * (1.0 + 1e-6),
                "{lo} {hi}"
            );
            // Normalised: one end of the range is reached.
            assert!(
                (lo - min).abs() < 1e-5 || (hi - max).abs() < 1e-5,
                "{lo} {hi}"
            );
            // Smooth: along any grid line ln f is ln(1 + a) times a
            // polynomial of degree <= 3 bounded by 1, so by Markov's
            // inequality |d/du| <= 9 ln(1 + a), with u in [-1, 1]. A
            // voxel-scale (noise-like) field would break this many times.
            for (ax, &n) in dims.iter().enumerate() {
                let step = 2.0 / (n - 1) as f64;
                let bound = 9.0 * (1.0 + a).ln() * step;
                let worst = f
                    .lanes(Axis(ax))
                    .into_iter()
                    .flat_map(|l| {
                        let v = l.to_vec();
                        v.windows(2)
                            .map(|w| (f64::from(w[1]).ln() - f64::from(w[0]).ln()).abs())
                            .collect::<Vec<_>>()
                    })
                    .fold(0.0, f64::max);
                // 1 % slack: the grid's max |p| can sit just below the line's.
                assert!(worst <= bound * 1.01, "axis {ax}: {worst} > {bound}");
                assert!(worst > 0.0);
            }
        }
        assert!(bias_field(dims, 0.0, 1).is_err());
    }

    #[test]
    fn bias_noise_keeps_labels_and_scales_noise_to_the_foreground() {
        let pair = test_pair([20, 20, 20], Matrix4::identity());
        let out = bias_noise(&pair, 0.0, 0.05, 3).unwrap();
        assert_eq!(out.label.data, pair.label.data);
        let diff: Vec<f64> = out
            .image
            .data
            .iter()
            .zip(&pair.image.data)
            .map(|(a, b)| f64::from(a - b))
            .collect();
        let rms = (diff.iter().map(|d| d * d).sum::<f64>() / diff.len() as f64).sqrt();
        let sigma = 0.05 * foreground_median(&pair).unwrap();
        // Rician on a bright signal is close to Gaussian with that sigma.
        assert!((rms / sigma - 1.0).abs() < 0.1, "{rms} vs {sigma}");
        assert_eq!(
            bias_noise(&pair, 0.0, 0.0, 3).unwrap().image.data,
            pair.image.data
        );
    }

    #[test]
    fn thick_slices_keep_every_kept_slice_at_its_world_position() {
        let a = oblique();
        let pair = test_pair([12, 10, 31], a);
        for (axis, thick) in [(2, 4.0), (0, 3.0), (1, 3.6)] {
            let out = thick_slices(&pair, axis, thick).unwrap();
            let sp = out.image.spacing;
            assert!((sp[axis] - thick).abs() < 1e-9, "{sp:?}");
            for o in (0..3).filter(|&o| o != axis) {
                assert!((sp[o] - pair.image.spacing[o]).abs() < 1e-9);
            }
            let ratio = thick / pair.image.spacing[axis];
            let n = pair.image.dims()[axis];
            let kept = out.image.dims()[axis];
            assert_eq!(kept, ((n - 1) as f64 / ratio).floor() as usize + 1);
            let start = ((n - 1) as f64 - (kept - 1) as f64 * ratio) / 2.0;
            for m in 0..kept {
                let mut new_idx = [3.0, 4.0, 5.0];
                new_idx[axis] = m as f64;
                let mut old_idx = new_idx;
                old_idx[axis] = start + m as f64 * ratio;
                let d = (world(&out.image.affine, new_idx) - world(&a, old_idx)).norm();
                assert!(d < 1e-9, "axis {axis} slice {m}: {d} mm off");
            }
            // The kept extent is centred in the old one.
            assert!((start - ((n - 1) as f64 - (kept - 1) as f64 * ratio) / 2.0).abs() < 1e-12);
            assert_eq!(out.label.dims(), out.image.dims());
        }
        // A linear ramp along the axis survives blur and sampling exactly
        // away from the edges (a symmetric kernel keeps a line).
        let ramp = test_pair([4, 4, 40], Matrix4::identity());
        let out = thick_slices(&ramp, 2, 5.0).unwrap();
        let z = |m: usize| world(&out.image.affine, [0.0, 0.0, m as f64]).z;
        for m in 2..out.image.dims()[2] - 2 {
            let want = 1.0 + 100.0 * z(m);
            let got = f64::from(out.image.data[[0, 0, 0, m]]);
            assert!((got - want).abs() < 1e-2, "slice {m}: {got} vs {want}");
        }
        assert!(thick_slices(&pair, 2, 0.5).is_err());
        assert!(thick_slices(&pair, 3, 5.0).is_err());
    }

    #[test]
    fn reorientation_keeps_every_voxel_in_world_space() {
        let a = oblique();
        let pair = test_pair([5, 6, 7], a);
        for (axes, flip) in [
            ([2, 0, 1], [true, false, true]),
            ([0, 1, 2], [false, true, false]),
            ([1, 2, 0], [false, false, false]),
        ] {
            let out = reorient(&pair, axes, flip).unwrap();
            for ((_, i, j, k), &v) in out.image.data.indexed_iter() {
                let w = world(&out.image.affine, [i as f64, j as f64, k as f64]);
                let src = a.try_inverse().unwrap() * Vector4::new(w.x, w.y, w.z, 1.0);
                let s = [src.x, src.y, src.z].map(|x| x.round());
                assert!((0..3).all(|c| (src[c] - s[c]).abs() < 1e-9));
                let s = s.map(|x| x as usize);
                assert_eq!(v, pair.image.data[[0, s[0], s[1], s[2]]]);
                assert_eq!(
                    out.label.data[[0, i, j, k]],
                    pair.label.data[[0, s[0], s[1], s[2]]]
                );
            }
        }
        assert!(reorient(&pair, [0, 0, 1], [false; 3]).is_err());
    }

    #[test]
    fn fov_cut_drops_low_slices_and_keeps_world_positions() {
        // Axis 1 is vertical (a coronal-like storage), pointing down.
        let mut a = Matrix4::zeros();
        a[(0, 0)] = 1.0;
        a[(2, 1)] = -2.0;
        a[(1, 2)] = 1.5;
        a[(3, 3)] = 1.0;
        a[(2, 3)] = 20.0; // slice j at z = 20 - 2 j
        let pair = test_pair([4, 16, 5], a);
        let out = fov_cut(&pair, -5.0).unwrap();
        // z >= -5 keeps j = 0..=12.
        assert_eq!(out.image.dims(), [4, 13, 5]);
        for ((_, i, j, k), &v) in out.image.data.indexed_iter() {
            let w = world(&out.image.affine, [i as f64, j as f64, k as f64]);
            assert!(w.z >= -5.0);
            assert_eq!(v, pair.image.data[[0, i, j, k]]);
            assert_eq!(w, world(&a, [i as f64, j as f64, k as f64]));
        }
        // Axis pointing up: the bottom slices are the first ones.
        let pair = test_pair([4, 5, 20], Matrix4::identity());
        let out = fov_cut(&pair, 6.5).unwrap();
        assert_eq!(out.image.dims(), [4, 5, 13]);
        assert_eq!(world(&out.image.affine, [0.0, 0.0, 0.0]).z, 7.0);
        assert_eq!(out.image.data[[0, 1, 2, 0]], pair.image.data[[0, 1, 2, 7]]);
        assert!(matches!(
            fov_cut(&pair, 100.0),
            Err(DegradeError::EmptyCut { .. })
        ));
    }

    #[test]
    fn resampling_is_exact_on_the_same_grid_and_linear_in_world_space() {
        let a = oblique();
        let pair = test_pair([8, 9, 10], a);
        let same = resample(&pair, a, pair.image.dims()).unwrap();
        assert_eq!(same.label.data, pair.label.data);
        for (x, y) in same.image.data.iter().zip(&pair.image.data) {
            assert!((x - y).abs() < 1e-3, "{x} vs {y}");
        }
        // The test image is linear in the index, so trilinear sampling on
        // a rotated grid gives exactly the linear value wherever inside.
        let (b, dims) = rotated_grid(&pair.image, [1.3, 1.3, 1.3], [10.0, 0.0, -15.0]).unwrap();
        let out = resample(&pair, b, dims).unwrap();
        let inv = a.try_inverse().unwrap();
        let mut inside = 0;
        for ((_, i, j, k), &v) in out.image.data.indexed_iter() {
            let w = world(&b, [i as f64, j as f64, k as f64]);
            let s = inv * Vector4::new(w.x, w.y, w.z, 1.0);
            let n = pair.image.dims();
            if (0..3).all(|c| (0.0..=(n[c] - 1) as f64).contains(&s[c])) {
                inside += 1;
                let want = 1.0 + s.x + 10.0 * s.y + 100.0 * s.z;
                assert!((f64::from(v) - want).abs() < 1e-3, "{v} vs {want}");
            }
        }
        assert!(inside > 100);
        // The grid holds the whole source field of view.
        for corner in [[0.0, 0.0, 0.0], [7.0, 8.0, 9.0], [7.0, 0.0, 9.0]] {
            let p = b.try_inverse().unwrap() * world(&a, corner).push(1.0);
            assert!(
                (0..3).all(|c| p[c] > -1e-9 && p[c] < dims[c] as f64 - 1.0 + 1e-9),
                "{p}"
            );
        }
    }
}
