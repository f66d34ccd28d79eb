//! Preprocessing: orientation to RAS, resampling to the model's spacing and
//! intensity normalisation. The geometric steps record their exact inverse
//! in an [`Inverse`], which maps model outputs back onto the input's own
//! grid so results overlay the input file voxel for voxel.
//!
//! Orientation is a pure permutation/flip of the voxel axes (never an
//! interpolation), so it is lossless and its inverse is exact. Resampling
//! builds MONAI's `Spacing` grid (see [`Resampling`]): the affine keeps any
//! obliqueness, and the step along each axis becomes the target spacing.

//!
//! One file per step with its inverse: `orientation.rs` (RAS permutation
//! and flips), `spacing.rs` (MONAI `Spacing` resampling) and `intensity.rs`
//! (normalisation, which needs no inverse); this file holds the spec, the
//! pipeline and the [`Inverse`] that undoes it.

mod intensity;
mod orientation;
mod spacing;
#[cfg(test)]
mod tests;

pub use intensity::normalize;
use nalgebra::{Matrix3, Matrix4};
use ndarray::{Array3, Array4, ArrayView3, ArrayView4, Axis};
pub use orientation::Reorientation;
use serde::{Deserialize, Serialize};
pub use spacing::Resampling;

use crate::volume::Volume;

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
    /// Clip to `[lo, hi]` and scale to `[0, 1]` (a CT window). `"window"`
    /// in manifests and settings, as MONAI and radiologists say; in code the
    /// word is kept for the sliding window.
    #[serde(rename = "window")]
    IntensityWindow { lo: f64, hi: f64 },
    /// `(v - mean) / std` with the population std. With `nonzero`, the
    /// statistics come from the nonzero voxels and only those are changed
    /// (MONAI `NormalizeIntensity(nonzero=True)`). A zero std only
    /// subtracts the mean.
    Zscore {
        #[serde(default)]
        nonzero: bool,
    },
    /// `(v - mean) / std` for every voxel, with the statistics of the
    /// head alone: the voxels above the channel's Otsu threshold (256 bins
    /// between its minimum and maximum). Unlike the whole-volume z-score it
    /// does not depend on how much air the field of view holds.
    #[serde(rename = "head_zscore")]
    HeadZscore,
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
        Normalization::IntensityWindow { lo, hi } => {
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
        Normalization::None | Normalization::Zscore { .. } | Normalization::HeadZscore => {}
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
