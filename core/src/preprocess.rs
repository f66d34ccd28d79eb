//! Preprocessing: orientation to RAS, resampling to the model's spacing and
//! intensity normalisation. The geometric steps record their exact inverse
//! in an [`Inverse`], which maps model outputs back onto the input's own
//! grid so results overlay the input file voxel for voxel.
//!
//! Orientation is a pure permutation/flip of the voxel axes (never an
//! interpolation), so it is lossless and its inverse is exact. Resampling
//! builds MONAI's `Spacing` grid (see [`Resampling`]): the affine keeps any
//! obliqueness, and the step along each axis becomes the target spacing.

use nalgebra::{Matrix3, Matrix4, Vector3, Vector4};
use ndarray::{Array3, Array4, ArrayView3, ArrayView4, ArrayViewMut3, Axis, Zip};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::volume::{Volume, spacing_of};

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("invalid preprocessing spec: {0}")]
    Spec(String),
    #[error("cannot preprocess this volume: {0}")]
    Input(String),
    #[error("{what} have shape {got:?}, expected {expected:?} ({grid})")]
    Shape {
        what: &'static str,
        /// Which grid `expected` describes.
        grid: &'static str,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
}

/// Intensity normalisation, applied to each channel independently.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Normalization {
    #[default]
    None,
    /// Clip to `[lo, hi]` and scale to `[0, 1]` (CT windows).
    Window { lo: f64, hi: f64 },
    /// `(v - mean) / std` with the population std. With `nonzero`, the
    /// statistics come from the nonzero voxels and only those are changed
    /// (MONAI `NormalizeIntensity(nonzero=True)`). A zero std only
    /// subtracts the mean.
    Zscore {
        #[serde(default)]
        nonzero: bool,
    },
    /// A window between two percentiles (in percent, e.g. 0.5 and 99.5),
    /// computed per channel with linear interpolation like `numpy.percentile`.
    Percentile { lo: f64, hi: f64 },
}

fn default_true() -> bool {
    true
}

/// What a model needs its input to look like.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessSpec {
    /// Permute/flip the voxel axes so they run along R, A, S.
    #[serde(default = "default_true")]
    pub reorient: bool,
    /// Voxel size in mm along the (reoriented) voxel axes; `None` keeps the
    /// input spacing.
    #[serde(default)]
    pub target_spacing: Option<[f64; 3]>,
    #[serde(default)]
    pub normalization: Normalization,
}

impl Default for PreprocessSpec {
    fn default() -> Self {
        PreprocessSpec {
            reorient: true,
            target_spacing: None,
            normalization: Normalization::None,
        }
    }
}

/// A permutation and flips of the voxel axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reorientation {
    /// `perm[i]`: the source voxel axis that becomes axis `i`.
    perm: [usize; 3],
    /// `flip[i]`: new axis `i` runs opposite to source axis `perm[i]`.
    flip: [bool; 3],
    /// Source dims (before reorientation).
    src_dims: [usize; 3],
}

impl Reorientation {
    pub fn identity(dims: [usize; 3]) -> Self {
        Reorientation {
            perm: [0, 1, 2],
            flip: [false; 3],
            src_dims: dims,
        }
    }

    /// The reorientation that makes voxel axis `i` run along world axis `i`
    /// (R, A, S) in the positive direction. Each voxel axis is assigned the
    /// world axis it is most aligned with; the assignment is the best of the
    /// 6 permutations (not a greedy per-axis pick), so oblique affines where
    /// two axes prefer the same world axis still get a proper permutation.
    pub fn to_ras(affine: &Matrix4<f64>, dims: [usize; 3]) -> Self {
        const PERMS: [[usize; 3]; 6] = [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ];
        let lin = affine.fixed_view::<3, 3>(0, 0);
        // Direction cosines: |cos| of the angle between voxel axis j and
        // world axis w.
        let cos = |w: usize, j: usize| {
            let n = lin.column(j).norm();
            if n > 0.0 { lin[(w, j)] / n } else { 0.0 }
        };
        let mut best = PERMS[0];
        let mut best_score = f64::NEG_INFINITY;
        for w in PERMS {
            // w[j]: world axis of voxel axis j.
            let score: f64 = (0..3).map(|j| cos(w[j], j).abs()).sum();
            if score > best_score + 1e-12 {
                best = w;
                best_score = score;
            }
        }
        let mut perm = [0; 3];
        let mut flip = [false; 3];
        for j in 0..3 {
            perm[best[j]] = j;
            flip[best[j]] = cos(best[j], j) < 0.0;
        }
        Reorientation {
            perm,
            flip,
            src_dims: dims,
        }
    }

    pub fn is_identity(&self) -> bool {
        self.perm == [0, 1, 2] && self.flip == [false; 3]
    }

    /// Dims after reorientation.
    pub fn dst_dims(&self) -> [usize; 3] {
        self.perm.map(|j| self.src_dims[j])
    }

    /// The reoriented affine: `affine * T` where `T` maps a new voxel index
    /// to the source voxel index it holds, so every voxel centre keeps its
    /// world position.
    pub fn apply_affine(&self, affine: &Matrix4<f64>) -> Matrix4<f64> {
        let mut t = Matrix4::zeros();
        t[(3, 3)] = 1.0;
        for i in 0..3 {
            let j = self.perm[i];
            if self.flip[i] {
                t[(j, i)] = -1.0;
                t[(j, 3)] = (self.src_dims[j] as f64) - 1.0;
            } else {
                t[(j, i)] = 1.0;
            }
        }
        affine * t
    }

    /// A `[C, X, Y, Z]` view in the new orientation (no copy).
    pub fn apply_view<'a, T>(&self, data: ArrayView4<'a, T>) -> ArrayView4<'a, T> {
        let p = self.perm;
        let mut v = data.permuted_axes([0, 1 + p[0], 1 + p[1], 1 + p[2]]);
        for i in 0..3 {
            if self.flip[i] {
                v.invert_axis(Axis(1 + i));
            }
        }
        v
    }

    /// Map a `[C, ...]` view in the new orientation back to the source
    /// orientation (no copy).
    pub fn invert_view<'a, T>(&self, data: ArrayView4<'a, T>) -> ArrayView4<'a, T> {
        let mut v = data;
        for i in 0..3 {
            if self.flip[i] {
                v.invert_axis(Axis(1 + i));
            }
        }
        // Source axis j sits at new axis w[j], the inverse permutation.
        let mut w = [0; 3];
        for (i, &j) in self.perm.iter().enumerate() {
            w[j] = i;
        }
        v.permuted_axes([0, 1 + w[0], 1 + w[1], 1 + w[2]])
    }
}

/// MONAI's `AFFINE_TOL`: an axis whose spacing is within this many mm of the
/// target keeps its own spacing, and a voxel map this close to the identity
/// is no resampling at all (`Spacing`, `spatial_resample`). Header round-off
/// (f32 pixdim, sform vs qform) therefore never triggers an interpolation.
const AFFINE_TOL: f64 = 1e-3;

/// Resampling to a target spacing on exactly the grid MONAI's
/// `Spacing(pixdim, diagonal=False)` builds, so a MONAI-trained model sees
/// the voxels it was trained on:
///
/// - the new affine keeps the input's rotation (`zoom_affine`: the
///   orthogonal factor of a Cholesky split, shear dropped) with the target
///   spacing as column norms;
/// - each axis gets `round((n - 1) * s / t + 1)` voxels, rounding half to
///   even (`compute_shape_offset`, from the extent of the voxel centres);
/// - the origin stays on the input's first voxel centre when that corner is
///   the new grid's minimum along every axis (to 1e-8 voxels, MONAI's test);
///   otherwise the new grid is centred on the old one. Oblique affines read
///   from NIfTI's f32 sform usually land on the centring branch, as they do
///   in MONAI;
/// - values are trilinear in the input's voxel indices, clamped at the
///   edges (`grid_sample`, `padding_mode="border"`, `align_corners=False`),
///   and the inverse (`Invertd`) samples the new grid the same way.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Resampling {
    /// New voxel index to source voxel index (MONAI's `xform`).
    to_src: Matrix4<f64>,
    /// Source voxel index to new voxel index (what `Invertd` samples with).
    to_dst: Matrix4<f64>,
    /// Both maps are diagonal to within `SEPARABLE_TOL` voxels over the
    /// grid, so one 1D pass per axis computes them.
    separable: bool,
    src_dims: [usize; 3],
    dst_dims: [usize; 3],
    /// The new grid's voxel-to-world affine.
    affine: Matrix4<f64>,
}

/// The largest shift (in voxels) that ignoring a map's off-diagonal terms
/// may cause before the separable passes give way to the 3D one. Obliques
/// read from f32 headers have off-diagonals near 1e-8, far below it.
const SEPARABLE_TOL: f64 = 1e-4;

impl Resampling {
    /// The resampling of a volume with voxel-to-world `affine` and `dims`
    /// to `target` mm per voxel; `None` when MONAI would not resample it.
    pub fn new(
        affine: &Matrix4<f64>,
        dims: [usize; 3],
        target: [f64; 3],
    ) -> Result<Option<Self>, PreprocessError> {
        if target.iter().any(|t| !(t.is_finite() && *t > 0.0)) {
            return Err(PreprocessError::Spec(format!(
                "target spacing {target:?} must be finite and > 0"
            )));
        }
        let degenerate = || {
            PreprocessError::Input(format!(
                "the affine is degenerate or not finite: {affine:?}"
            ))
        };
        let spacing = spacing_of(affine);
        let out_spacing: [f64; 3] = std::array::from_fn(|a| {
            if (spacing[a] - target[a]).abs() <= AFFINE_TOL {
                spacing[a]
            } else {
                target[a]
            }
        });
        let lin: Matrix3<f64> = affine.fixed_view::<3, 3>(0, 0).into_owned();
        // zoom_affine: lin = rotation * zs with zs upper triangular (the
        // transposed Cholesky factor of lin' lin, positive diagonal).
        let zs = (lin.transpose() * lin)
            .cholesky()
            .ok_or_else(degenerate)?
            .l()
            .transpose();
        // inv(zs) by back-substitution, as NumPy's LU-based inverse does: on
        // an axis-aligned affine the factors are then exact and a grid that
        // ties (47 * 5 / 2 + 1 = 118.5) rounds as in MONAI.
        let zs_inv = zs
            .solve_upper_triangular(&Matrix3::identity())
            .ok_or_else(degenerate)?;
        let rotation = lin * zs_inv;
        let new_lin = rotation * Matrix3::from_diagonal(&Vector3::from(out_spacing));
        let mut zoomed = Matrix4::identity();
        zoomed.fixed_view_mut::<3, 3>(0, 0).copy_from(&new_lin);

        // compute_shape_offset: the input's voxel-centre corners in the
        // zoomed (translation-free) grid's voxel coordinates.
        let to_zoomed = zoomed.lu().solve(affine).ok_or_else(degenerate)?;
        let corners: Vec<Vector4<f64>> = (0..8)
            .map(|i| {
                // NumPy's meshgrid(indexing="ij") order: the last axis varies fastest.
                let bit = |a: usize| (i >> (2 - a)) & 1 == 1;
                let c = |a: usize| if bit(a) { (dims[a] - 1) as f64 } else { 0.0 };
                Vector4::new(c(0), c(1), c(2), 1.0)
            })
            .collect();
        let out: Vec<Vector4<f64>> = corners.iter().map(|c| to_zoomed * c).collect();
        let mut dst_dims = [0; 3];
        for (a, d) in dst_dims.iter_mut().enumerate() {
            let lo = out.iter().map(|p| p[a]).fold(f64::INFINITY, f64::min);
            let hi = out.iter().map(|p| p[a]).fold(f64::NEG_INFINITY, f64::max);
            let n = (hi - lo + 1.0).round_ties_even();
            if !n.is_finite() || n >= 1e9 {
                return Err(PreprocessError::Spec(format!(
                    "resampling {dims:?} voxels of {spacing:?} mm to {target:?} mm \
                     gives an absurd grid"
                )));
            }
            *d = (n as usize).max(1);
        }
        let min_corner = out
            .iter()
            .position(|p| out.iter().all(|q| (0..3).all(|a| q[a] - p[a] >= -1e-8)));
        let offset = match min_corner {
            Some(i) => (affine * corners[i]).xyz(),
            None => {
                let half = |d: [usize; 3]| Vector3::from(d.map(|n| n as f64 / 2.0));
                let t: Vector3<f64> = affine.fixed_view::<3, 1>(0, 3).into_owned();
                lin * half(dims) + t - new_lin * half(dst_dims)
            }
        };
        let mut new_affine = zoomed;
        new_affine.fixed_view_mut::<3, 1>(0, 3).copy_from(&offset);

        let to_src = affine.lu().solve(&new_affine).ok_or_else(degenerate)?;
        let to_dst = new_affine.lu().solve(affine).ok_or_else(degenerate)?;
        if to_src.iter().chain(to_dst.iter()).any(|v| !v.is_finite()) {
            return Err(degenerate());
        }
        let unchanged = dst_dims == dims
            && (close(affine, &new_affine) || close(&to_src, &Matrix4::identity()));
        if unchanged {
            return Ok(None);
        }
        let separable = off_axis_shift(&to_src, dst_dims) <= SEPARABLE_TOL
            && off_axis_shift(&to_dst, dims) <= SEPARABLE_TOL;
        Ok(Some(Resampling {
            to_src,
            to_dst,
            separable,
            src_dims: dims,
            dst_dims,
            affine: new_affine,
        }))
    }

    pub fn dst_dims(&self) -> [usize; 3] {
        self.dst_dims
    }

    /// The new grid's voxel-to-world affine.
    pub fn affine(&self) -> &Matrix4<f64> {
        &self.affine
    }

    pub fn src_dims(&self) -> [usize; 3] {
        self.src_dims
    }

    /// Trilinear (edge-clamped) resampling of a `[C, ...]` image on the
    /// source grid onto the new grid.
    pub fn forward_linear(&self, data: ArrayView4<f32>) -> Result<Array4<f32>, PreprocessError> {
        self.run(data, Direction::Forward, Interp::Linear, lerp)
    }

    /// Source-grid `[C, ...]` array onto the new grid, nearest neighbour.
    pub fn forward_nearest<T: Copy + Default + Send + Sync>(
        &self,
        data: ArrayView4<T>,
    ) -> Result<Array4<T>, PreprocessError> {
        self.run(data, Direction::Forward, Interp::Nearest, nearest)
    }

    /// New-grid `[C, ...]` array back onto the source grid, trilinear.
    pub fn inverse_linear(&self, data: ArrayView4<f32>) -> Result<Array4<f32>, PreprocessError> {
        self.run(data, Direction::Inverse, Interp::Linear, lerp)
    }

    /// New-grid `[C, ...]` array back onto the source grid, nearest neighbour.
    pub fn inverse_nearest<T: Copy + Default + Send + Sync>(
        &self,
        data: ArrayView4<T>,
    ) -> Result<Array4<T>, PreprocessError> {
        self.run(data, Direction::Inverse, Interp::Nearest, nearest)
    }

    fn run<T, F>(
        &self,
        data: ArrayView4<T>,
        dir: Direction,
        interp: Interp,
        combine: F,
    ) -> Result<Array4<T>, PreprocessError>
    where
        T: Copy + Default + Send + Sync,
        F: Fn(T, T, f64) -> T + Sync,
    {
        let (from, to, map, what, grid) = match dir {
            Direction::Forward => (
                self.src_dims,
                self.dst_dims,
                &self.to_src,
                "resampling input",
                "the grid before resampling",
            ),
            Direction::Inverse => (
                self.dst_dims,
                self.src_dims,
                &self.to_dst,
                "resampling inverse input",
                "the resampled grid",
            ),
        };
        if data.shape()[1..] != from {
            let mut expected = vec![data.shape()[0]];
            expected.extend_from_slice(&from);
            return Err(PreprocessError::Shape {
                what,
                grid,
                expected,
                got: data.shape().to_vec(),
            });
        }
        if !self.separable {
            return Ok(resample_3d(data, map, to, interp, combine));
        }
        let maps = (0..3)
            .map(|a| AxisMap::new(to[a], from[a], map[(a, a)], map[(a, 3)], a, interp))
            .collect::<Vec<_>>();
        Ok(resample(data, &maps, combine))
    }
}

/// `numpy.allclose(a, b, atol=AFFINE_TOL)` (rtol 1e-5), as MONAI compares.
fn close(a: &Matrix4<f64>, b: &Matrix4<f64>) -> bool {
    a.iter()
        .zip(b.iter())
        .all(|(x, y)| (x - y).abs() <= AFFINE_TOL + 1e-5 * y.abs())
}

/// How far (in voxels) the off-diagonal terms of a voxel map move a sample
/// anywhere on a grid of `dims`.
fn off_axis_shift(map: &Matrix4<f64>, dims: [usize; 3]) -> f64 {
    (0..3)
        .map(|a| {
            (0..3)
                .filter(|&b| b != a)
                .map(|b| map[(a, b)].abs() * (dims[b].max(1) - 1) as f64)
                .sum::<f64>()
        })
        .fold(0.0, f64::max)
}

#[derive(Clone, Copy)]
enum Direction {
    Forward,
    Inverse,
}

#[derive(Clone, Copy)]
enum Interp {
    Linear,
    Nearest,
}

impl Interp {
    /// The two input indices along an axis of `n` voxels that a sample at
    /// voxel coordinate `x` reads, and the weight of the second. Coordinates
    /// outside the grid clamp to its edge (`padding_mode="border"`).
    fn sample(self, x: f64, n: usize) -> (usize, usize, f64) {
        let last = (n - 1) as f64;
        match self {
            Interp::Linear => {
                let x = x.clamp(0.0, last);
                let i0 = (x.floor() as usize).min(n - 1);
                (i0, (i0 + 1).min(n - 1), x - i0 as f64)
            }
            Interp::Nearest => {
                // Round half up; the nudge keeps an exact half that arrives
                // as k + 0.4999999 through float round-off on the same side.
                let i = (x + 0.5 + 1e-9).floor().clamp(0.0, last) as usize;
                (i, i, 0.0)
            }
        }
    }
}

fn nearest<T>(a: T, _: T, _: f64) -> T {
    a
}

fn lerp(a: f32, b: f32, w: f64) -> f32 {
    // w == 0 must return `a` bit-exactly (identity axes, integer up-factors).
    // f64 inside, as MONAI resamples (`dtype=float64`): one f32 rounding
    // per pass keeps CT-sized values within 1e-4 of MONAI's.
    if w == 0.0 {
        a
    } else {
        (f64::from(a) * (1.0 - w) + f64::from(b) * w) as f32
    }
}

/// For one axis: output index `o` reads input `i0[o]` and `i1[o]` with
/// weight `w[o]` on `i1`. Nearest neighbour is the special case `w = 0`.
struct AxisMap {
    /// Voxel axis 0..3 (array axis 1..4).
    axis: usize,
    /// The map is the identity: the pass can be skipped.
    identity: bool,
    /// How much the axis shrinks (input / output): passes that shrink run
    /// first so intermediate arrays stay small.
    shrink: f64,
    i0: Vec<usize>,
    i1: Vec<usize>,
    w: Vec<f64>,
}

impl AxisMap {
    /// Output voxel `o` sits at input voxel coordinate `o * step + shift`.
    fn new(n_out: usize, n_in: usize, step: f64, shift: f64, axis: usize, interp: Interp) -> Self {
        let mut m = AxisMap {
            axis,
            identity: n_out == n_in && step == 1.0 && shift == 0.0,
            shrink: n_in as f64 / n_out as f64,
            i0: Vec::with_capacity(n_out),
            i1: Vec::with_capacity(n_out),
            w: Vec::with_capacity(n_out),
        };
        for o in 0..n_out {
            let (i0, i1, w) = interp.sample(o as f64 * step + shift, n_in);
            m.i0.push(i0);
            m.i1.push(i1);
            m.w.push(w);
        }
        m
    }
}

/// One 3D pass for voxel maps that mix axes (a sheared input, whose shear
/// MONAI's new grid drops): output voxel `o` samples the input at
/// `map * o`, trilinear or nearest.
fn resample_3d<T, F>(
    data: ArrayView4<T>,
    map: &Matrix4<f64>,
    to: [usize; 3],
    interp: Interp,
    combine: F,
) -> Array4<T>
where
    T: Copy + Default + Send + Sync,
    F: Fn(T, T, f64) -> T + Sync,
{
    let sh = data.shape();
    let from = [sh[1], sh[2], sh[3]];
    let mut out = Array4::from_elem((sh[0], to[0], to[1], to[2]), T::default());
    let planes: Vec<(usize, ArrayViewMut3<T>)> = out.axis_iter_mut(Axis(1)).enumerate().collect();
    planes.into_par_iter().for_each(|(x, mut plane)| {
        for y in 0..to[1] {
            for z in 0..to[2] {
                let p = map * Vector4::new(x as f64, y as f64, z as f64, 1.0);
                let [(x0, x1, wx), (y0, y1, wy), (z0, z1, wz)] =
                    std::array::from_fn(|a| interp.sample(p[a], from[a]));
                for c in 0..sh[0] {
                    let v = |i, j, k| data[[c, i, j, k]];
                    let along_z = |i, j| combine(v(i, j, z0), v(i, j, z1), wz);
                    let along_y = |i| combine(along_z(i, y0), along_z(i, y1), wy);
                    plane[[c, y, z]] = combine(along_y(x0), along_y(x1), wx);
                }
            }
        }
    });
    out
}

/// Separable resampling: one 1D pass per axis that changes (equal to
/// trilinear / nearest in 3D, at a fraction of the reads). Always returns a
/// fresh standard-layout array.
fn resample<T, F>(data: ArrayView4<T>, maps: &[AxisMap], combine: F) -> Array4<T>
where
    T: Copy + Default + Send + Sync,
    F: Fn(T, T, f64) -> T + Sync,
{
    let mut order: Vec<&AxisMap> = maps.iter().filter(|m| !m.identity).collect();
    order.sort_by(|a, b| b.shrink.total_cmp(&a.shrink));
    let mut current: Option<Array4<T>> = None;
    for m in order {
        let next = match &current {
            Some(arr) => resample_axis(arr.view(), m, &combine),
            None => resample_axis(data.view(), m, &combine),
        };
        current = Some(next);
    }
    match current {
        Some(arr) => arr,
        None => data.as_standard_layout().into_owned(),
    }
}

/// One 1D pass. `combine(a, b, 0.0)` must return `a` (true for both linear
/// and nearest), which lets weight-0 outputs be plain copies.
fn resample_axis<T, F>(input: ArrayView4<T>, map: &AxisMap, combine: &F) -> Array4<T>
where
    T: Copy + Default + Send + Sync,
    F: Fn(T, T, f64) -> T + Sync,
{
    let axis = map.axis + 1;
    let mut shape = [0; 4];
    shape.copy_from_slice(input.shape());
    shape[axis] = map.i0.len();
    let mut out = Array4::from_elem(shape, T::default());
    let innermost = (0..4)
        .filter(|&a| input.shape()[a] > 1)
        .min_by_key(|&a| input.strides()[a].unsigned_abs());
    if innermost == Some(axis) {
        // The axis is contiguous in memory: interpolate along lanes, in
        // parallel over the longest other axis (disjoint output slabs).
        let outer = (0..4)
            .filter(|&a| a != axis)
            .max_by_key(|&a| shape[a])
            .unwrap_or(0);
        let lane_axis = Axis(if outer < axis { axis - 1 } else { axis });
        let pairs: Vec<(ArrayView3<T>, ArrayViewMut3<T>)> = input
            .axis_iter(Axis(outer))
            .zip(out.axis_iter_mut(Axis(outer)))
            .collect();
        pairs.into_par_iter().for_each(|(src, mut dst)| {
            Zip::from(src.lanes(lane_axis))
                .and(dst.lanes_mut(lane_axis))
                .for_each(|s, mut d| {
                    for (o, v) in d.iter_mut().enumerate() {
                        *v = combine(s[map.i0[o]], s[map.i1[o]], map.w[o]);
                    }
                });
        });
    } else {
        // A strided axis: combine whole hyperplanes, so the inner loops run
        // over memory-contiguous data instead of hopping a page per voxel.
        let planes: Vec<(usize, ArrayViewMut3<T>)> =
            out.axis_iter_mut(Axis(axis)).enumerate().collect();
        planes.into_par_iter().for_each(|(o, mut dst)| {
            let a = input.index_axis(Axis(axis), map.i0[o]);
            let w = map.w[o];
            if w == 0.0 {
                dst.assign(&a);
            } else {
                let b = input.index_axis(Axis(axis), map.i1[o]);
                Zip::from(&mut dst)
                    .and(&a)
                    .and(&b)
                    .for_each(|d, &x, &y| *d = combine(x, y, w));
            }
        });
    }
    out
}

/// Everything needed to put a model-grid result back on the input grid.
#[derive(Clone, Debug)]
pub struct Inverse {
    original_dims: [usize; 3],
    original_affine: Matrix4<f64>,
    reorientation: Reorientation,
    resampling: Option<Resampling>,
    model_dims: [usize; 3],
}

impl Inverse {
    /// Dims of the input volume (what the inverse produces).
    pub fn original_dims(&self) -> [usize; 3] {
        self.original_dims
    }

    pub fn original_affine(&self) -> &Matrix4<f64> {
        &self.original_affine
    }

    /// Dims of the preprocessed volume (what the inverse accepts).
    pub fn model_dims(&self) -> [usize; 3] {
        self.model_dims
    }

    pub fn reorientation(&self) -> &Reorientation {
        &self.reorientation
    }

    pub fn resampling(&self) -> Option<&Resampling> {
        self.resampling.as_ref()
    }

    /// Labels `[X, Y, Z]` on the preprocessed grid to labels on the original
    /// grid (nearest neighbour).
    pub fn labels(&self, labels: Array3<u8>) -> Result<Array3<u8>, PreprocessError> {
        if labels.shape() != self.model_dims {
            return Err(PreprocessError::Shape {
                what: "labels",
                grid: "the preprocessed grid",
                expected: self.model_dims.to_vec(),
                got: labels.shape().to_vec(),
            });
        }
        let data = labels.insert_axis(Axis(0));
        let out = self.map_back(data, |r, v| r.inverse_nearest(v))?;
        Ok(out.index_axis_move(Axis(0), 0))
    }

    /// Per-class scores `[K, X, Y, Z]` on the preprocessed grid to the
    /// original grid (trilinear).
    pub fn logits(&self, logits: Array4<f32>) -> Result<Array4<f32>, PreprocessError> {
        let sh = logits.shape();
        if sh[1..] != self.model_dims || sh[0] == 0 {
            let mut expected = vec![sh[0].max(1)];
            expected.extend_from_slice(&self.model_dims);
            return Err(PreprocessError::Shape {
                what: "logits",
                grid: "the preprocessed grid",
                expected,
                got: sh.to_vec(),
            });
        }
        self.map_back(logits, |r, v| r.inverse_linear(v))
    }

    fn map_back<T, F>(
        &self,
        data: Array4<T>,
        resample_back: F,
    ) -> Result<Array4<T>, PreprocessError>
    where
        T: Copy,
        F: Fn(&Resampling, ArrayView4<T>) -> Result<Array4<T>, PreprocessError>,
    {
        let data = match &self.resampling {
            Some(r) => resample_back(r, data.view())?,
            None => data,
        };
        if self.reorientation.is_identity() {
            return Ok(data);
        }
        Ok(self
            .reorientation
            .invert_view(data.view())
            .as_standard_layout()
            .into_owned())
    }
}

fn check_volume(vol: &Volume) -> Result<(), PreprocessError> {
    if vol.data.is_empty() {
        return Err(PreprocessError::Input(format!(
            "empty volume of shape {:?}",
            vol.data.shape()
        )));
    }
    let a = &vol.affine;
    let lin: Matrix3<f64> = a.fixed_view::<3, 3>(0, 0).into_owned();
    let norms: f64 = (0..3).map(|c| lin.column(c).norm()).product();
    if a.iter().any(|v| !v.is_finite()) || lin.determinant().abs() <= 1e-6 * norms {
        return Err(PreprocessError::Input(format!(
            "the affine is degenerate or not finite: {a:?}"
        )));
    }
    Ok(())
}

fn check_spec(spec: &PreprocessSpec) -> Result<(), PreprocessError> {
    match spec.normalization {
        Normalization::Window { lo, hi } => {
            if !(lo.is_finite() && hi.is_finite() && hi > lo) {
                return Err(PreprocessError::Spec(format!(
                    "window [{lo}, {hi}] needs finite bounds with hi > lo"
                )));
            }
        }
        Normalization::Percentile { lo, hi } => {
            if !(0.0..=100.0).contains(&lo) || !(0.0..=100.0).contains(&hi) || hi <= lo {
                return Err(PreprocessError::Spec(format!(
                    "percentiles [{lo}, {hi}] must satisfy 0 <= lo < hi <= 100"
                )));
            }
        }
        Normalization::None | Normalization::Zscore { .. } => {}
    }
    if let Some(t) = spec.target_spacing
        && t.iter().any(|v| !(v.is_finite() && *v > 0.0))
    {
        return Err(PreprocessError::Spec(format!(
            "target spacing {t:?} must be finite and > 0"
        )));
    }
    Ok(())
}

/// The reorientation and resampling [`preprocess`] applies to `vol`: pure
/// geometry, nothing allocated, so sizes can be checked before they are.
pub fn geometry(
    vol: &Volume,
    spec: &PreprocessSpec,
) -> Result<(Reorientation, Option<Resampling>), PreprocessError> {
    check_spec(spec)?;
    check_volume(vol)?;
    let dims = vol.dims();
    let reorientation = if spec.reorient {
        Reorientation::to_ras(&vol.affine, dims)
    } else {
        Reorientation::identity(dims)
    };
    let affine = reorientation.apply_affine(&vol.affine);
    let resampling = match spec.target_spacing {
        Some(t) => Resampling::new(&affine, reorientation.dst_dims(), t)?,
        None => None,
    };
    Ok((reorientation, resampling))
}

/// Reorient, resample and normalise `vol` as `spec` asks. Returns the model
/// input (standard layout, no header: it describes a new grid) and the
/// [`Inverse`] that maps results back onto `vol`'s grid.
pub fn preprocess(
    vol: &Volume,
    spec: &PreprocessSpec,
) -> Result<(Volume, Inverse), PreprocessError> {
    let (reorientation, resampling) = geometry(vol, spec)?;
    let dims = vol.dims();
    let affine = reorientation.apply_affine(&vol.affine);
    let mut data = to_model_grid(
        vol.data.view(),
        &reorientation,
        resampling.as_ref(),
        |r, v| r.forward_linear(v),
    )?;
    let affine = match &resampling {
        Some(r) => *r.affine(),
        None => affine,
    };

    for mut channel in data.axis_iter_mut(Axis(0)) {
        let values = channel.as_slice_mut().ok_or_else(|| {
            PreprocessError::Input("internal: preprocessed data is not contiguous".into())
        })?;
        normalize(values, &spec.normalization);
    }

    let model_dims = [data.shape()[1], data.shape()[2], data.shape()[3]];
    let inverse = Inverse {
        original_dims: dims,
        original_affine: vol.affine,
        reorientation,
        resampling,
        model_dims,
    };
    Ok((Volume::new(data, affine), inverse))
}

/// Labels `[X, Y, Z]` on the grid of the volume that [`preprocess`] turned
/// into `inverse`, carried onto the model grid by the very reorientation
/// and resampling recorded there: nearest neighbour (labels are
/// categories, not intensities) and never normalised.
///
/// Replaying the recorded geometry, rather than deriving it again from the
/// label file's own header, guarantees the labels land on the image's grid
/// voxel for voxel even where the two headers differ by round-off; the
/// caller is responsible for checking that the label was stored on the
/// image's grid in the first place.
pub fn preprocess_labels(
    labels: ArrayView3<u8>,
    inverse: &Inverse,
) -> Result<Array3<u8>, PreprocessError> {
    if labels.shape() != inverse.original_dims {
        return Err(PreprocessError::Shape {
            what: "labels",
            grid: "the grid of the image before preprocessing",
            expected: inverse.original_dims.to_vec(),
            got: labels.shape().to_vec(),
        });
    }
    let out = to_model_grid(
        labels.insert_axis(Axis(0)),
        &inverse.reorientation,
        inverse.resampling.as_ref(),
        |r, v| r.forward_nearest(v),
    )?;
    Ok(out.index_axis_move(Axis(0), 0))
}

/// `[C, X, Y, Z]` data on the input grid onto the model grid. Images and
/// labels share this one path (differing only in the interpolation), so a
/// change to the geometry cannot misalign them. At most one copy is made:
/// the resampler reads the reoriented view directly.
fn to_model_grid<T, F>(
    data: ArrayView4<T>,
    reorientation: &Reorientation,
    resampling: Option<&Resampling>,
    resample: F,
) -> Result<Array4<T>, PreprocessError>
where
    T: Copy,
    F: Fn(&Resampling, ArrayView4<T>) -> Result<Array4<T>, PreprocessError>,
{
    let oriented = reorientation.apply_view(data);
    match resampling {
        Some(r) => resample(r, oriented),
        None => Ok(oriented.as_standard_layout().into_owned()),
    }
}

const CHUNK: usize = 1 << 16;

/// Normalise one channel in place. The spec has been validated.
pub fn normalize(values: &mut [f32], norm: &Normalization) {
    match *norm {
        Normalization::None => {}
        Normalization::Window { lo, hi } => window(values, lo, hi),
        Normalization::Zscore { nonzero } => zscore(values, nonzero),
        Normalization::Percentile { lo, hi } => {
            let (plo, phi) = percentiles(values, lo, hi);
            if phi > plo {
                window(values, plo, phi);
            } else {
                // A constant channel: every value sits at the window's floor.
                tracing::warn!(
                    lo,
                    hi,
                    value = plo,
                    "percentile window is empty (constant channel); output is 0"
                );
                values.par_iter_mut().for_each(|v| *v = 0.0);
            }
        }
    }
}

fn window(values: &mut [f32], lo: f64, hi: f64) {
    let scale = 1.0 / (hi - lo);
    values.par_chunks_mut(CHUNK).for_each(|c| {
        for v in c {
            *v = ((f64::from(*v).clamp(lo, hi) - lo) * scale) as f32;
        }
    });
}

fn zscore(values: &mut [f32], nonzero: bool) {
    let keep = |v: f32| !nonzero || v != 0.0;
    // Two passes in f64 (mean, then squared deviations): one pass with
    // sum of squares loses everything on CT-sized offsets.
    let (sum, count) = values
        .par_chunks(CHUNK)
        .map(|c| {
            c.iter()
                .filter(|v| keep(**v))
                .fold((0.0f64, 0u64), |(s, n), v| (s + f64::from(*v), n + 1))
        })
        .reduce(|| (0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    if count == 0 {
        return;
    }
    let mean = sum / count as f64;
    let ss: f64 = values
        .par_chunks(CHUNK)
        .map(|c| {
            c.iter()
                .filter(|v| keep(**v))
                .map(|v| (f64::from(*v) - mean).powi(2))
                .sum::<f64>()
        })
        .sum();
    let std = (ss / count as f64).sqrt();
    let inv = if std > 0.0 { 1.0 / std } else { 1.0 };
    values.par_chunks_mut(CHUNK).for_each(|c| {
        for v in c.iter_mut().filter(|v| keep(**v)) {
            *v = ((f64::from(*v) - mean) * inv) as f32;
        }
    });
}

/// The `lo` and `hi` percentiles (linear interpolation between order
/// statistics, numpy's default). Uses one scratch copy and two O(n)
/// selections instead of a sort.
fn percentiles(values: &[f32], lo: f64, hi: f64) -> (f64, f64) {
    let mut scratch = values.to_vec();
    let n = scratch.len();
    let rank = |p: f64| p / 100.0 * (n - 1) as f64;
    let (rlo, rhi) = (rank(lo), rank(hi));
    let klo = (rlo.floor() as usize).min(n - 1);
    let khi = (rhi.floor() as usize).min(n - 1).max(klo);
    let (_, vlo, upper) = scratch.select_nth_unstable_by(klo, f32::total_cmp);
    let vlo = *vlo;
    // Everything above klo is now in `upper`, unordered.
    let next_lo = upper.iter().copied().min_by(f32::total_cmp).unwrap_or(vlo);
    let (vhi, next_hi) = if khi == klo {
        (vlo, next_lo)
    } else {
        let (_, vhi, upper) = upper.select_nth_unstable_by(khi - klo - 1, f32::total_cmp);
        let vhi = *vhi;
        (
            vhi,
            upper.iter().copied().min_by(f32::total_cmp).unwrap_or(vhi),
        )
    };
    let interp = |v: f32, next: f32, r: f64, k: usize| {
        f64::from(v) + (f64::from(next) - f64::from(v)) * (r - k as f64)
    };
    (
        interp(vlo, next_lo, rlo, klo),
        interp(vhi, next_hi, rhi, khi),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(a: &Matrix4<f64>, v: [usize; 3]) -> Vector4<f64> {
        a * Vector4::new(v[0] as f64, v[1] as f64, v[2] as f64, 1.0)
    }

    fn voxel_of(a: &Matrix4<f64>, w: &Vector4<f64>) -> [usize; 3] {
        let inv = a.try_inverse().unwrap();
        let v = inv * w;
        for i in 0..3 {
            assert!(
                (v[i] - v[i].round()).abs() < 1e-6,
                "not a voxel centre: {v}"
            );
        }
        [
            v[0].round() as usize,
            v[1].round() as usize,
            v[2].round() as usize,
        ]
    }

    fn coded(dims: [usize; 3], channels: usize) -> Array4<f32> {
        Array4::from_shape_fn((channels, dims[0], dims[1], dims[2]), |(c, x, y, z)| {
            (c * 1_000_000 + x * 10_000 + y * 100 + z) as f32
        })
    }

    const PERMS: [[usize; 3]; 6] = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];

    /// All 48 storage orders: voxel axis j runs along world axis p[j] with
    /// sign from the flip bits.
    fn all_orientations() -> Vec<Matrix4<f64>> {
        let spacing = [0.7, 1.3, 2.9];
        let mut out = Vec::new();
        for p in PERMS {
            for bits in 0..8 {
                let mut a = Matrix4::identity();
                for j in 0..3 {
                    a[(j, j)] = 0.0;
                }
                for j in 0..3 {
                    let sign = if bits & (1 << j) != 0 { -1.0 } else { 1.0 };
                    a[(p[j], j)] = sign * spacing[j];
                }
                a[(0, 3)] = 12.5;
                a[(1, 3)] = -40.0;
                a[(2, 3)] = 7.25;
                out.push(a);
            }
        }
        out
    }

    #[test]
    fn all_48_orientations_keep_world_positions_and_invert_exactly() {
        let dims = [4, 5, 6];
        let data = coded(dims, 2);
        let orientations = all_orientations();
        assert_eq!(orientations.len(), 48);
        for a in orientations {
            let vol = Volume::new(data.clone(), a);
            let spec = PreprocessSpec::default();
            let (out, inv) = preprocess(&vol, &spec).unwrap();
            // RAS: a positive diagonal.
            for i in 0..3 {
                assert!(out.affine[(i, i)] > 0.0, "{a} -> {}", out.affine);
            }
            for ((c, x, y, z), v) in data.indexed_iter() {
                let w = world(&a, [x, y, z]);
                let [i, j, k] = voxel_of(&out.affine, &w);
                assert_eq!(out.data[[c, i, j, k]], *v);
            }
            let back = inv.logits(out.data.clone()).unwrap();
            assert_eq!(back, data);
            let labels = out
                .data
                .index_axis(Axis(0), 0)
                .mapv(|v| (v as u32 % 251) as u8);
            let back = inv.labels(labels).unwrap();
            assert_eq!(
                back,
                data.index_axis(Axis(0), 0).mapv(|v| (v as u32 % 251) as u8)
            );
        }
    }

    #[test]
    fn labels_follow_the_image_geometry_in_all_48_orientations() {
        let dims = [4, 5, 6];
        let labels = Array3::from_shape_fn(dims, |(x, y, z)| ((x * 31 + y * 7 + z) % 251) as u8);
        let resampled = PreprocessSpec {
            target_spacing: Some([1.0, 1.0, 1.0]),
            ..PreprocessSpec::default()
        };
        for a in all_orientations() {
            let vol = Volume::new(coded(dims, 1), a);
            // Without resampling the labels move exactly like the image's
            // voxels, whose values encode where they came from.
            let (out, inv) = preprocess(&vol, &PreprocessSpec::default()).unwrap();
            let moved = preprocess_labels(labels.view(), &inv).unwrap();
            for ((i, j, k), v) in moved.indexed_iter() {
                let code = out.data[[0, i, j, k]] as usize;
                let src = [code / 10_000, code / 100 % 100, code % 100];
                assert_eq!(*v, labels[src]);
            }
            assert_eq!(inv.labels(moved).unwrap(), labels);

            // With resampling each model voxel takes the label of the input
            // voxel nearest to it in world space (the spacings leave no
            // exact ties).
            let (out, inv) = preprocess(&vol, &resampled).unwrap();
            let moved = preprocess_labels(labels.view(), &inv).unwrap();
            assert_eq!(moved.shape(), &out.dims()[..]);
            let to_input = a.try_inverse().unwrap() * out.affine;
            for ((i, j, k), v) in moved.indexed_iter() {
                let p = to_input * Vector4::new(i as f64, j as f64, k as f64, 1.0);
                let q = [0, 1, 2].map(|d| p[d].round().clamp(0.0, (dims[d] - 1) as f64) as usize);
                assert_eq!(*v, labels[q], "{a}: model voxel {:?}", (i, j, k));
            }
        }
        let (_, inv) = preprocess(
            &Volume::new(coded(dims, 1), Matrix4::identity()),
            &PreprocessSpec::default(),
        )
        .unwrap();
        let err = preprocess_labels(Array3::zeros((4, 5, 7)).view(), &inv).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("[4, 5, 7]") && msg.contains("before preprocessing"),
            "{msg}"
        );
    }

    #[test]
    fn oblique_affine_gets_a_proper_permutation() {
        // LPS-like storage, rotated 20 degrees about the S axis, axes stored
        // in the order (S, L, P).
        let (s, c) = 20f64.to_radians().sin_cos();
        #[rustfmt::skip]
        let rot = Matrix3::new(
            c, -s, 0.0,
            s, c, 0.0,
            0.0, 0.0, 1.0,
        );
        let dirs = Matrix3::new(0.0, -1.0, 0.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0);
        let lin = rot * dirs * Matrix3::from_diagonal(&nalgebra::Vector3::new(2.0, 0.8, 0.9));
        let mut a = Matrix4::identity();
        a.fixed_view_mut::<3, 3>(0, 0).copy_from(&lin);
        a[(0, 3)] = 30.0;
        let dims = [3, 7, 5];
        let r = Reorientation::to_ras(&a, dims);
        assert_eq!(r.perm, [1, 2, 0]);
        assert_eq!(r.flip, [true, true, false]);
        let data = coded(dims, 1);
        let vol = Volume::new(data.clone(), a);
        let (out, inv) = preprocess(&vol, &PreprocessSpec::default()).unwrap();
        for ((c, x, y, z), v) in data.indexed_iter() {
            let [i, j, k] = voxel_of(&out.affine, &world(&a, [x, y, z]));
            assert_eq!(out.data[[c, i, j, k]], *v);
        }
        for i in 0..3 {
            let col = out.affine.fixed_view::<3, 1>(0, i);
            let dominant = (0..3).max_by(|&p, &q| col[p].abs().total_cmp(&col[q].abs()));
            assert_eq!(dominant, Some(i));
            assert!(col[i] > 0.0);
        }
        assert_eq!(inv.logits(out.data).unwrap(), data);
    }

    #[test]
    fn a_45_degree_tie_still_gives_a_permutation() {
        let (s, c) = 45f64.to_radians().sin_cos();
        let mut a = Matrix4::identity();
        a[(0, 0)] = c;
        a[(1, 0)] = s;
        a[(0, 1)] = -s;
        a[(1, 1)] = c;
        let r = Reorientation::to_ras(&a, [2, 3, 4]);
        let mut seen = r.perm;
        seen.sort_unstable();
        assert_eq!(seen, [0, 1, 2]);
    }

    fn diag(spacing: [f64; 3]) -> Matrix4<f64> {
        Matrix4::from_diagonal(&Vector4::new(spacing[0], spacing[1], spacing[2], 1.0))
    }

    #[test]
    fn monai_grid_counts_voxel_centres_and_rounds_half_to_even() {
        // The lung CT of issue 19: 48 slices of 5 mm to 2 mm is 118 slices
        // (MONAI), not round(48 * 5 / 2) = 120.
        let r = Resampling::new(&diag([0.7, 0.7, 5.0]), [512, 512, 48], [1.5, 1.5, 2.0])
            .unwrap()
            .unwrap();
        // 511 * 0.7 / 1.5 + 1 = 239.47; 47 * 5 / 2 + 1 = 118.5 -> 118.
        assert_eq!(r.dst_dims(), [239, 239, 118]);
        // Axis-aligned: the first voxel centre stays, steps are the target.
        let err = (r.affine() - diag([1.5, 1.5, 2.0])).abs().max();
        assert!(err < 1e-12, "{}", r.affine());
    }

    #[test]
    fn sheared_input_takes_the_3d_pass_and_samples_world_positions() {
        // A sheared affine: MONAI's grid drops the shear, so the new voxel
        // axes cut across the old ones and no 1D pass can follow them.
        #[rustfmt::skip]
        let a = Matrix4::new(
            1.0, 0.3, 0.0, 5.0,
            0.0, 1.0, 0.2, -3.0,
            0.0, 0.0, 2.0, 1.0,
            0.0, 0.0, 0.0, 1.0,
        );
        let dims = [12, 10, 8];
        let r = Resampling::new(&a, dims, [1.5, 1.5, 1.5]).unwrap().unwrap();
        assert!(!r.separable);
        // A field linear in world coordinates is reproduced exactly by
        // trilinear sampling wherever the sample lies inside the input.
        let field = |w: Vector4<f64>| (w[0] * 3.0 - w[1] * 2.0 + w[2]) as f32;
        let img = Array4::from_shape_fn((1, dims[0], dims[1], dims[2]), |(_, x, y, z)| {
            field(a * Vector4::new(x as f64, y as f64, z as f64, 1.0))
        });
        let out = r.forward_linear(img.view()).unwrap();
        let to_input = a.try_inverse().unwrap() * r.affine();
        let mut inside = 0;
        for ((_, i, j, k), v) in out.indexed_iter() {
            let o = Vector4::new(i as f64, j as f64, k as f64, 1.0);
            let p = to_input * o;
            if (0..3).all(|d| p[d] >= 0.0 && p[d] <= (dims[d] - 1) as f64) {
                inside += 1;
                let want = field(r.affine() * o);
                assert!((v - want).abs() < 1e-3, "{:?}: {v} vs {want}", (i, j, k));
            }
        }
        assert!(inside > out.len() / 3, "{inside} of {}", out.len());
        // And back: the inverse samples the new grid at the input's centres.
        let back = r.inverse_linear(out.view()).unwrap();
        assert_eq!(back.shape(), img.shape());
        // Where all 8 new-grid voxels around an input voxel hold exact
        // (unclamped) samples, the field comes back exactly.
        let to_new = r.affine().try_inverse().unwrap() * a;
        let dst = r.dst_dims();
        let exact = |c: [f64; 3]| {
            let p = to_input * Vector4::new(c[0], c[1], c[2], 1.0);
            (0..3).all(|d| p[d] >= 0.0 && p[d] <= (dims[d] - 1) as f64)
        };
        let mut inside = 0;
        for ((_, x, y, z), v) in back.indexed_iter() {
            let q = to_new * Vector4::new(x as f64, y as f64, z as f64, 1.0);
            let lo = [0, 1, 2].map(|d| q[d].floor());
            let cell_ok =
                (0..8).all(|bits| exact([0, 1, 2].map(|d| lo[d] + f64::from((bits >> d) & 1))));
            if cell_ok && (0..3).all(|d| q[d] >= 0.0 && q[d] <= (dst[d] - 1) as f64) {
                inside += 1;
                let want = img[[0, x, y, z]];
                assert!((v - want).abs() < 1e-3, "{:?}: {v} vs {want}", (x, y, z));
            }
        }
        assert!(inside > back.len() / 10, "{inside} of {}", back.len());
    }

    #[test]
    fn integer_upsampling_of_labels_inverts_exactly() {
        let dims = [5, 4, 3];
        let labels = Array3::from_shape_fn(dims, |(x, y, z)| ((x * 7 + y * 3 + z) % 5) as u8);
        // Source spacing 3 x 2 x 1, target 1 x 1 x 0.5: integer factors;
        // (n - 1) * s / t + 1 voxels.
        let r = Resampling::new(&diag([3.0, 2.0, 1.0]), dims, [1.0, 1.0, 0.5])
            .unwrap()
            .unwrap();
        assert_eq!(r.dst_dims(), [13, 7, 5]);
        let up = r
            .forward_nearest(labels.view().insert_axis(Axis(0)))
            .unwrap();
        let back = r.inverse_nearest(up.view()).unwrap();
        assert_eq!(back.index_axis(Axis(0), 0), labels);

        // Images: up then back is exact at integer factors (weights 0).
        let img = coded(dims, 2);
        let up = r.forward_linear(img.view()).unwrap();
        let back = r.inverse_linear(up.view()).unwrap();
        assert_eq!(back, img);
        // Wrong shapes are errors, not panics.
        assert!(r.inverse_linear(img.view()).is_err());
        assert!(r.forward_linear(up.view()).is_err());
    }

    #[test]
    fn downsampling_then_inverse_restores_the_sampled_voxels() {
        let dims = [8, 6, 4];
        let labels = Array3::from_shape_fn(dims, |(x, y, z)| ((x + 2 * y + 3 * z) % 7) as u8);
        let r = Resampling::new(&diag([1.0, 1.0, 1.0]), dims, [2.0, 2.0, 2.0])
            .unwrap()
            .unwrap();
        // 8 -> 4.5 -> 4, 6 -> 3.5 -> 4, 4 -> 2.5 -> 2: half to even.
        assert_eq!(r.dst_dims(), [4, 4, 2]);
        let down = r
            .forward_nearest(labels.view().insert_axis(Axis(0)))
            .unwrap();
        let back = r.inverse_nearest(down.view()).unwrap();
        assert_eq!(back.shape(), &[1, 8, 6, 4]);
        // Every voxel the coarse grid sampled comes back unchanged.
        for x in (0..8).step_by(2) {
            for y in (0..6).step_by(2) {
                for z in (0..4).step_by(2) {
                    assert_eq!(back[[0, x, y, z]], labels[[x, y, z]]);
                }
            }
        }
    }

    #[test]
    fn smooth_image_survives_up_and_down_resampling() {
        let dims = [20, 16, 12];
        let img = Array4::from_shape_fn((1, 20, 16, 12), |(_, x, y, z)| {
            (x as f32 * 0.3).sin() + (y as f32 * 0.2).cos() + z as f32 * 0.1
        });
        let r = Resampling::new(&diag([1.0, 1.2, 2.0]), dims, [0.7, 0.5, 1.1])
            .unwrap()
            .unwrap();
        let up = r.forward_linear(img.view()).unwrap();
        let back = r.inverse_linear(up.view()).unwrap();
        assert_eq!(back.shape(), img.shape());
        let err = (&back - &img).mapv(f32::abs).fold(0.0f32, |m, v| m.max(*v));
        assert!(err < 0.05, "max error {err}");
    }

    #[test]
    fn resampling_geometry_follows_the_spec() {
        let mut a = Matrix4::identity();
        a[(0, 0)] = -1.5;
        a[(1, 1)] = 1.5;
        a[(2, 2)] = 3.0;
        let vol = Volume::new(coded([10, 10, 7], 1), a);
        let spec = PreprocessSpec {
            reorient: false,
            target_spacing: Some([1.0, 1.5, 2.0]),
            normalization: Normalization::None,
        };
        let (out, inv) = preprocess(&vol, &spec).unwrap();
        // n' = round((n - 1) * s / t + 1), half to even: 14.5 -> 14.
        assert_eq!(out.dims(), [14, 10, 10]);
        assert_eq!(out.spacing, [1.0, 1.5, 2.0]);
        assert_eq!(out.affine[(0, 0)], -1.0);
        // First voxel centre preserved; y untouched (matching spacing).
        assert_eq!(out.affine.column(3), a.column(3));
        assert_eq!(inv.original_dims(), [10, 10, 7]);
        assert_eq!(inv.model_dims(), [14, 10, 10]);
        // The data is linear in the index, which trilinear reproduces:
        // x' = 2 sits at x = 2 / 1.5, z' = 4 at z = 4 * 2 / 3.
        let expect = (2.0 / 1.5) * 10_000.0 + 300.0 + 4.0 * 2.0 / 3.0;
        assert!((f64::from(out.data[[0, 2, 3, 4]]) - expect).abs() < 1e-2);
    }

    #[test]
    fn matching_spacing_skips_resampling() {
        let a = diag([1.0, 2.0, 3.0]);
        assert!(
            Resampling::new(&a, [4, 4, 4], [1.0, 2.0 * (1.0 + 1e-8), 3.0])
                .unwrap()
                .is_none()
        );
        // MONAI's tolerance: within 1e-3 mm of the target keeps the spacing.
        assert!(
            Resampling::new(&a, [4, 4, 4], [1.0009, 2.0, 2.9991])
                .unwrap()
                .is_none()
        );
        assert!(
            Resampling::new(&a, [4, 4, 4], [1.0011, 2.0, 3.0])
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn inverse_checks_shapes() {
        let vol = Volume::new(coded([4, 5, 6], 1), Matrix4::identity());
        let (_, inv) = preprocess(&vol, &PreprocessSpec::default()).unwrap();
        let err = inv.labels(Array3::zeros((4, 5, 7))).unwrap_err();
        assert!(err.to_string().contains("[4, 5, 7]"), "{err}");
        assert!(inv.logits(Array4::zeros((2, 4, 6, 5))).is_err());
        assert!(inv.logits(Array4::zeros((0, 4, 5, 6))).is_err());
    }

    #[test]
    fn window_values_hand_checked() {
        let mut v = [-1100.0, -1000.0, 0.0, 200.0, 400.0, 3000.0];
        normalize(
            &mut v,
            &Normalization::Window {
                lo: -1000.0,
                hi: 400.0,
            },
        );
        let expect = [0.0, 0.0, 1000.0 / 1400.0, 1200.0 / 1400.0, 1.0, 1.0];
        for (a, b) in v.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
    }

    #[test]
    fn zscore_values_hand_checked() {
        // mean 5, population std 2.
        let mut v = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
        normalize(&mut v, &Normalization::Zscore { nonzero: false });
        assert_eq!(v, [-1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 1.0, 2.0]);

        // Zeros are excluded from the stats and left alone.
        let mut v = [0.0, 2.0, 0.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
        normalize(&mut v, &Normalization::Zscore { nonzero: true });
        assert_eq!(v, [0.0, -1.5, 0.0, -0.5, -0.5, -0.5, 0.0, 0.0, 1.0, 2.0]);

        // Constant: std 0 subtracts the mean only.
        let mut v = [3.0; 4];
        normalize(&mut v, &Normalization::Zscore { nonzero: false });
        assert_eq!(v, [0.0; 4]);
    }

    #[test]
    fn percentiles_match_numpy() {
        // numpy.percentile(np.arange(101.), [0.5, 99.5]) == [0.5, 99.5]
        let v: Vec<f32> = (0..=100).rev().map(|i| i as f32).collect();
        let (lo, hi) = percentiles(&v, 0.5, 99.5);
        assert!(
            (lo - 0.5).abs() < 1e-9 && (hi - 99.5).abs() < 1e-9,
            "{lo} {hi}"
        );
        // numpy.percentile([1, 2, 3, 4, 10], [25, 90]) == [2.0, 7.6]
        let (lo, hi) = percentiles(&[10.0, 1.0, 4.0, 3.0, 2.0], 25.0, 90.0);
        assert!(
            (lo - 2.0).abs() < 1e-9 && (hi - 7.6).abs() < 1e-6,
            "{lo} {hi}"
        );
        let (lo, hi) = percentiles(&[5.0], 1.0, 99.0);
        assert_eq!((lo, hi), (5.0, 5.0));

        let mut v = [10.0, 1.0, 4.0, 3.0, 2.0];
        normalize(&mut v, &Normalization::Percentile { lo: 25.0, hi: 90.0 });
        let expect = [1.0, 0.0, 2.0 / 5.6, 1.0 / 5.6, 0.0];
        for (a, b) in v.iter().zip(expect) {
            assert!((f64::from(*a) - b).abs() < 1e-6, "{v:?}");
        }
    }

    #[test]
    fn spec_validation_and_serde() {
        let vol = Volume::new(coded([2, 2, 2], 1), Matrix4::identity());
        for bad in [
            Normalization::Window { lo: 1.0, hi: 1.0 },
            Normalization::Window { lo: 2.0, hi: 1.0 },
            Normalization::Percentile { lo: 50.0, hi: 10.0 },
            Normalization::Percentile { lo: -1.0, hi: 10.0 },
        ] {
            let spec = PreprocessSpec {
                normalization: bad,
                ..PreprocessSpec::default()
            };
            assert!(matches!(
                preprocess(&vol, &spec),
                Err(PreprocessError::Spec(_))
            ));
        }
        let spec = PreprocessSpec {
            target_spacing: Some([1.0, 0.0, 1.0]),
            ..PreprocessSpec::default()
        };
        assert!(preprocess(&vol, &spec).is_err());

        let spec: PreprocessSpec = serde_json::from_str(
            r#"{"target_spacing": [1.5, 1.5, 2.0],
                "normalization": {"kind": "window", "lo": -100, "hi": 240}}"#,
        )
        .unwrap();
        assert!(spec.reorient);
        assert_eq!(
            spec.normalization,
            Normalization::Window {
                lo: -100.0,
                hi: 240.0
            }
        );
        let n: Normalization = serde_json::from_str(r#"{"kind": "zscore"}"#).unwrap();
        assert_eq!(n, Normalization::Zscore { nonzero: false });
        let n: Normalization =
            serde_json::from_str(r#"{"kind": "percentile", "lo": 0.5, "hi": 99.5}"#).unwrap();
        assert_eq!(n, Normalization::Percentile { lo: 0.5, hi: 99.5 });
        assert!(
            serde_json::from_str::<Normalization>(r#"{"kind": "zscore", "nonzer": true}"#).is_err()
        );
        let json = serde_json::to_string(&Normalization::None).unwrap();
        assert_eq!(json, r#"{"kind":"none"}"#);
    }

    #[test]
    fn degenerate_affine_is_refused() {
        let mut a = Matrix4::identity();
        a[(2, 2)] = 0.0;
        let vol = Volume::new(coded([2, 2, 2], 1), a);
        assert!(matches!(
            preprocess(&vol, &PreprocessSpec::default()),
            Err(PreprocessError::Input(_))
        ));
    }
}
