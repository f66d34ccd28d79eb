//! The in-memory image: voxels plus the geometry needed to put results back.

use nalgebra::Matrix4;
use ndarray::Array4;

/// A (possibly multi-channel) 3D image.
///
/// `data` has shape `[C, X, Y, Z]` in standard (C) layout, where X is NIfTI's
/// first (fastest-varying on disk) axis: `data[[c, i, j, k]]` is voxel
/// `(i, j, k)` of channel `c`. Channel-first matches how MONAI feeds NIfTI
/// volumes to models (`[N, C, X, Y, Z]`), so foreign models run unchanged.
#[derive(Clone, Debug)]
pub struct Volume {
    pub data: Array4<f32>,
    /// Voxel index `(i, j, k, 1)` to world millimetres (RAS+, NIfTI convention).
    pub affine: Matrix4<f64>,
    /// Voxel size in millimetres along X, Y, Z (always > 0).
    pub spacing: [f64; 3],
    /// The header the volume was read with. Outputs are written with this
    /// header's grid, codes and units so they overlay the input exactly.
    pub header: Option<nifti::NiftiHeader>,
}

impl Volume {
    /// A volume with no source header (tests, synthetic data). Spacing is
    /// derived from the affine's column norms.
    pub fn new(data: Array4<f32>, affine: Matrix4<f64>) -> Self {
        let spacing = spacing_of(&affine);
        Volume {
            data,
            affine,
            spacing,
            header: None,
        }
    }

    pub fn channels(&self) -> usize {
        self.data.shape()[0]
    }

    pub fn dims(&self) -> [usize; 3] {
        let s = self.data.shape();
        [s[1], s[2], s[3]]
    }

    pub fn voxel_count(&self) -> usize {
        self.data.len()
    }
}

/// Column norms of the linear part of an affine: the voxel size along each axis.
pub fn spacing_of(affine: &Matrix4<f64>) -> [f64; 3] {
    let mut s = [0.0; 3];
    for (c, v) in s.iter_mut().enumerate() {
        *v = (0..3).map(|r| affine[(r, c)].powi(2)).sum::<f64>().sqrt();
    }
    s
}
