//! Blending overlapping predictions: the blend mode, MONAI's importance
//! map, and the accumulator that sums weighted windows into the output.

use ndarray::{Array3, Array4};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::InferenceError;
use super::grid::*;
use crate::backend::Model;

/// How overlapping window predictions are weighted when blended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlendMode {
    /// A Gaussian centred on the window: voxels near a window's edge, where
    /// the model saw the least context, count the least.
    #[default]
    Gaussian,
    /// Every prediction counts the same.
    Constant,
}

/// Returns the accumulator for `classes` output channels, creating it on the
/// first batch and checking that later batches agree.
pub(crate) fn classes_accumulator<'a>(
    acc: &'a mut Option<Accumulator>,
    classes: usize,
    fixed_classes: Option<usize>,
    dims: [usize; 3],
    model: &dyn Model,
) -> Result<&'a mut Accumulator, InferenceError> {
    let expected = acc.as_ref().map(Accumulator::classes).or(fixed_classes);
    if let Some(k) = expected.filter(|&k| k != classes) {
        return Err(InferenceError::ModelOutput {
            model: model.output().to_string(),
            reason: format!("returned {classes} channels, expected {k}"),
        });
    }
    Ok(acc.get_or_insert_with(|| Accumulator::new(classes, dims)))
}

/// Blends window predictions: a running weighted sum per class plus the sum of
/// the weights, over a `[K, X, Y, Z]` grid. Plain Rust, no model involved, so
/// it can be benchmarked and reused (the slab runner uses it per slice).
#[derive(Clone, Debug)]
pub struct Accumulator {
    classes: usize,
    dims: [usize; 3],
    /// `[K, X, Y, Z]`, C order.
    sum: Vec<f32>,
    /// `[X, Y, Z]`, C order: one weight per voxel, shared by all classes.
    weight: Vec<f32>,
}

impl Accumulator {
    pub fn new(classes: usize, dims: [usize; 3]) -> Self {
        let voxels: usize = dims.iter().product();
        Accumulator {
            classes,
            dims,
            sum: vec![0.0; classes * voxels],
            weight: vec![0.0; voxels],
        }
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    pub fn dims(&self) -> [usize; 3] {
        self.dims
    }

    /// Adds one window's prediction `pred` (`[K, rx, ry, rz]`, C order),
    /// weighted by `importance` (`[rx, ry, rz]`). `origin` is where the
    /// window's first voxel lies in the image; the parts of the window
    /// outside the image (MONAI's padding: a negative origin, or a window
    /// running past the far edge) are skipped.
    pub fn add(
        &mut self,
        origin: [isize; 3],
        roi: [usize; 3],
        pred: &[f32],
        importance: &[f32],
    ) -> Result<(), InferenceError> {
        let window_len: usize = roi.iter().product();
        if importance.len() != window_len || pred.len() != self.classes * window_len {
            return Err(InferenceError::Shape(format!(
                "a window of {roi:?} with {} classes needs {} predictions and {} weights, got {} and {}",
                self.classes,
                self.classes * window_len,
                window_len,
                pred.len(),
                importance.len()
            )));
        }
        let spans: [Span; 3] = std::array::from_fn(|a| clip(origin[a], roi[a], self.dims[a]));
        if spans.iter().any(|s| s.len == 0) {
            return Ok(());
        }
        let dims = self.dims;
        let voxels: usize = dims.iter().product();

        let add_class = |sum: &mut [f32], pred: &[f32]| {
            for_each_row(dims, roi, &spans, |img, win, len| {
                let out = &mut sum[img..img + len];
                let p = &pred[win..win + len];
                let w = &importance[win..win + len];
                for ((o, &p), &w) in out.iter_mut().zip(p).zip(w) {
                    // Product first, then the sum, both rounded to f32: the
                    // same operations as MONAI's `out[idx] += w * pred`.
                    *o += w * p;
                }
            });
        };
        // Serial on purpose: splitting the classes over threads measured no
        // faster (the loop is memory-bound), and windows overlap, so they
        // cannot be blended concurrently.
        for (sum, pred) in self.sum.chunks_mut(voxels).zip(pred.chunks(window_len)) {
            add_class(sum, pred);
        }
        let weight = &mut self.weight;
        for_each_row(dims, roi, &spans, |img, win, len| {
            for (o, &w) in weight[img..img + len]
                .iter_mut()
                .zip(&importance[win..win + len])
            {
                *o += w;
            }
        });
        Ok(())
    }

    /// Divides the sums by the weights and returns `[K, X, Y, Z]`. A voxel no
    /// window covered comes out NaN (0 / 0), as in MONAI; the sliding window
    /// always covers every voxel.
    pub fn into_output(mut self) -> Result<Array4<f32>, InferenceError> {
        self.normalise();
        let [x, y, z] = self.dims;
        Array4::from_shape_vec((self.classes, x, y, z), self.sum)
            .map_err(|e| InferenceError::Shape(e.to_string()))
    }

    fn normalise(&mut self) {
        let voxels = self.weight.len();
        if voxels == 0 {
            return;
        }
        let weight = &self.weight;
        self.sum.par_chunks_mut(voxels).for_each(|class| {
            for (s, &w) in class.iter_mut().zip(weight) {
                *s /= w;
            }
        });
    }

    /// Hands out the blended value of every (class, voxel), then clears the
    /// sums and weights so the accumulator can take the next slice.
    pub(crate) fn drain(&mut self, mut put: impl FnMut(usize, usize, f32)) {
        self.normalise();
        let voxels = self.weight.len();
        if voxels > 0 {
            for (k, class) in self.sum.chunks(voxels).enumerate() {
                for (v, &value) in class.iter().enumerate() {
                    put(k, v, value);
                }
            }
        }
        self.sum.fill(0.0);
        self.weight.fill(0.0);
    }
}

/// MONAI's `compute_importance_map` followed by the clamp
/// `sliding_window_inference` applies: the weight of each voxel of a window.
///
/// Gaussian mode: the outer product of per-axis `exp(-x² / (2σ²))`,
/// `x = -(r-1)/2 ..= (r-1)/2`, `σ = sigma_scale · r`, not normalised, then
/// clamped below at `max(min, 1e-3)`. Constant mode: ones. Computed in f32 in
/// the same order as MONAI (torch, float32) so the weights agree to the bit
/// or nearly.
pub fn importance_map(roi: [usize; 3], mode: BlendMode, sigma_scale: f64) -> Array3<f32> {
    let values = importance_nd(&roi, mode, sigma_scale);
    let [_, ry, rz] = roi;
    Array3::from_shape_fn(roi, |(i, j, k)| values[(i * ry + j) * rz + k])
}

/// [`importance_map`] for any number of axes, C order.
pub(crate) fn importance_nd(roi: &[usize], mode: BlendMode, sigma_scale: f64) -> Vec<f32> {
    let mut map = match mode {
        BlendMode::Constant => vec![1.0f32; roi.iter().product()],
        BlendMode::Gaussian => {
            // MONAI: map = g0; map = map[..., None] * g_i[None, ...] per axis.
            let mut map = vec![1.0f32];
            for (i, &r) in roi.iter().enumerate() {
                let g = gaussian_1d(r, sigma_scale);
                map = if i == 0 {
                    g
                } else {
                    map.iter()
                        .flat_map(|&a| g.iter().map(move |&b| a * b))
                        .collect()
                };
            }
            map
        }
    };
    // `max(torch.min(map).item(), 1e-3)` compares in f64; torch then clamps
    // with that bound rounded to f32.
    let min = map.iter().copied().fold(f32::INFINITY, f32::min);
    if min.is_finite() {
        let floor = (min as f64).max(1e-3) as f32;
        for v in &mut map {
            *v = v.max(floor);
        }
    }
    map
}

pub(super) fn gaussian_1d(r: usize, sigma_scale: f64) -> Vec<f32> {
    let sigma = sigma_scale * r as f64;
    // torch: `x**2 / (-2 * sigma**2)`, the Python float divisor rounded to f32.
    let divisor = (-2.0 * sigma * sigma) as f32;
    let half = (r as f32 - 1.0) / 2.0;
    (0..r)
        .map(|i| {
            let x = i as f32 - half;
            (x * x / divisor).exp()
        })
        .collect()
}

pub(crate) fn validate_blend(
    overlap: f64,
    mode: BlendMode,
    sigma_scale: f64,
    batch_size: usize,
) -> Result<(), InferenceError> {
    validate_overlap(overlap)?;
    if mode == BlendMode::Gaussian && !(sigma_scale > 0.0 && sigma_scale.is_finite()) {
        return Err(InferenceError::Settings(format!(
            "sigma_scale must be a positive number, got {sigma_scale}"
        )));
    }
    if batch_size == 0 {
        return Err(InferenceError::Settings(
            "batch_size must be at least 1".into(),
        ));
    }
    Ok(())
}
