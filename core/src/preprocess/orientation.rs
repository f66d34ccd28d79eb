//! Orientation to RAS: a permutation and flips of the voxel axes, lossless
//! and exactly invertible.

use nalgebra::Matrix4;
use ndarray::{ArrayView4, Axis};

/// A permutation and flips of the voxel axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reorientation {
    /// `perm[i]`: the source voxel axis that becomes axis `i`.
    pub(super) perm: [usize; 3],
    /// `flip[i]`: new axis `i` runs opposite to source axis `perm[i]`.
    pub(super) flip: [bool; 3],
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
