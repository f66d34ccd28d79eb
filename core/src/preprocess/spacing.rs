//! Resampling to the model's spacing on MONAI's `Spacing` grid, trilinear
//! for images and nearest for labels, with its inverse onto the input grid.

use nalgebra::{Matrix3, Matrix4, Vector3, Vector4};
use ndarray::{Array4, ArrayView3, ArrayView4, ArrayViewMut3, Axis, Zip};
use rayon::prelude::*;

use super::PreprocessError;
use crate::volume::spacing_of;

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
    pub(super) separable: bool,
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
