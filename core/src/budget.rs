//! The memory one volume's run needs, worked out from the geometry before
//! anything is allocated, so a hostile header, a huge `model.roi` or a tiny
//! `model.spacing` is refused with the setting to change instead of ending
//! in the kernel's OOM killer or an allocation abort.

use std::fmt;

use crate::backend::Model;
use crate::inference::grid::{axis_window_count, resolve_roi};
use crate::manifest::{InferenceMode, Manifest};
use crate::preprocess::{self, PreprocessError};
use crate::volume::Volume;

/// The large allocations of one run, in bytes (f32 unless noted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryPlan {
    /// The input voxels as read, alive for the whole run.
    pub input: u128,
    /// The model grid `[X, Y, Z]` (the input reoriented and resampled to the
    /// manifest's or `model.spacing`'s spacing).
    pub model_dims: [usize; 3],
    /// Voxels of the model grid, all channels.
    pub model_voxels: u128,
    /// The resampler's two intermediate arrays, forward or back.
    pub resampling: u128,
    /// The model input and the blending accumulators (classes + weight).
    pub blending: u128,
    /// The importance map of one window (`model.roi`).
    pub importance: u128,
    /// One batch of windows in and out (`model.roi` x `window_batch`).
    pub batch: u128,
    /// Window positions (24 bytes each).
    pub windows: u128,
    /// Logits on the input grid, the label map and post-processing.
    pub output: u128,
}

impl MemoryPlan {
    /// The largest amount alive at once: the input throughout, plus the
    /// costliest of preprocessing, inference and mapping back.
    pub fn peak(&self) -> u128 {
        let model_input = self.model_voxels * 4;
        let pre = self.resampling + model_input;
        let infer = self.blending + self.importance + self.batch + self.windows;
        let back = self.resampling + self.output;
        self.input + pre.max(infer).max(back)
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "input {}, model grid {:?} {}, windows of model.roi: importance map {} and one \
             batch {}, window list {}, resampling {}, outputs {}",
            mib(self.input),
            self.model_dims,
            mib(self.blending),
            mib(self.importance),
            mib(self.batch),
            mib(self.windows),
            mib(self.resampling),
            mib(self.output),
        )
    }
}

/// Bytes as whole MiB, rounded up.
pub fn mib(bytes: u128) -> String {
    format!("{} MiB", bytes.div_ceil(1 << 20))
}

/// Why a run does not fit.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error(transparent)]
    Geometry(#[from] PreprocessError),
    #[error(
        "the model grid {dims:?} ({voxels} voxels with all channels: the input resampled to \
         the model's spacing, model.spacing) is more than limits.max_voxels = {max}"
    )]
    TooManyVoxels {
        dims: [usize; 3],
        voxels: u128,
        max: u64,
    },
    #[error(
        "segmenting needs about {} at its peak, more than limits.memory_budget_mb = {} MiB \
         ({plan}); lower model.roi or window_batch, coarsen model.spacing, or raise the budget",
        mib(.plan.peak()),
        .budget >> 20
    )]
    OverBudget { plan: Box<MemoryPlan>, budget: u64 },
}

/// What running `manifest` on `vol` with `window_batch` windows per call
/// allocates, from the geometry alone.
pub fn plan(
    vol: &Volume,
    manifest: &Manifest,
    model: &dyn Model,
    window_batch: usize,
) -> Result<MemoryPlan, PreprocessError> {
    let (reorientation, resampling) = preprocess::geometry(vol, &manifest.preprocess)?;
    let dims = vol.dims();
    let c = vol.channels() as u128;
    let k = manifest.labels.len().max(1) as u128;
    let n = prod(&dims);
    let model_dims = resampling
        .as_ref()
        .map_or(reorientation.dst_dims(), |r| r.dst_dims());
    let g = prod(&model_dims);
    // Each pass of the separable resampler makes a new array; the larger
    // side of each axis bounds both intermediates.
    let resampling_bytes = resampling.as_ref().map_or(0, |r| {
        let (src, dst) = (r.src_dims(), r.dst_dims());
        let widest: u128 = (0..3).map(|a| src[a].max(dst[a]) as u128).product();
        2 * c.max(k) * widest * 4
    });
    let fixed_batch = model.input().shape.first().and_then(|d| d.fixed());
    let (window, windows, in_per_window, out_per_window) = match &manifest.inference {
        InferenceMode::SlidingWindow(sw) => {
            let roi = resolve_roi(sw.roi, model_dims);
            let count: u128 = (0..3)
                .map(|a| axis_window_count(model_dims[a], roi[a], sw.overlap) as u128)
                .product();
            let w = prod(&roi);
            (w, count, c * w, k * w)
        }
        InferenceMode::Slab(s) => {
            let shape = &model.input().shape;
            let plane = shape.len().saturating_sub(2);
            let roi: [usize; 2] = std::array::from_fn(|a| match s.roi_xy {
                Some(r) if r[a] > 0 => r[a],
                Some(_) => model_dims[a],
                None => shape
                    .get(plane + a)
                    .and_then(|d| d.fixed())
                    .unwrap_or(model_dims[a]),
            });
            let count = (0..2)
                .map(|a| axis_window_count(model_dims[a], roi[a], s.overlap) as u128)
                .product::<u128>()
                * model_dims[2] as u128;
            let w = prod(&roi);
            (w, count, c * s.depth as u128 * w, k * w)
        }
    };
    let per_call =
        fixed_batch.map_or_else(|| (window_batch as u128).min(windows).max(1), |b| b as u128);
    Ok(MemoryPlan {
        input: c * n * 4,
        model_dims,
        model_voxels: c * g,
        resampling: resampling_bytes,
        blending: (c + k + 1) * g * 4,
        importance: window * 4,
        batch: per_call * (in_per_window + out_per_window) * 4,
        windows: windows * 24,
        // Logits on the input grid (kept when saved), labels, and the
        // connected-component labelling of post-processing (u32 per voxel).
        output: k * n * 4 + n + n * 4,
    })
}

/// [`plan`], refused when the model grid passes `max_voxels` or the peak
/// passes `budget` bytes (0 = no budget).
pub fn check(
    vol: &Volume,
    manifest: &Manifest,
    model: &dyn Model,
    window_batch: usize,
    max_voxels: u64,
    budget: u64,
) -> Result<MemoryPlan, BudgetError> {
    let plan = plan(vol, manifest, model, window_batch)?;
    if plan.model_voxels > u128::from(max_voxels) {
        return Err(BudgetError::TooManyVoxels {
            dims: plan.model_dims,
            voxels: plan.model_voxels,
            max: max_voxels,
        });
    }
    if budget > 0 && plan.peak() > u128::from(budget) {
        return Err(BudgetError::OverBudget {
            plan: Box::new(plan),
            budget,
        });
    }
    Ok(plan)
}

fn prod(dims: &[usize]) -> u128 {
    dims.iter().map(|&d| d as u128).product()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::test_util::FnModel;
    use crate::inference::{Slab, SlidingWindow};
    use crate::preprocess::{Normalization, PreprocessSpec};
    use nalgebra::Matrix4;
    use ndarray::Array4;

    fn volume(dims: [usize; 3], spacing: f64) -> Volume {
        let mut affine = Matrix4::identity() * spacing;
        affine[(3, 3)] = 1.0;
        Volume::new(Array4::zeros((1, dims[0], dims[1], dims[2])), affine)
    }

    fn manifest(inference: InferenceMode, spacing: Option<f64>) -> Manifest {
        Manifest {
            format: crate::manifest::MANIFEST_FORMAT,
            name: None,
            input_channels: 1,
            labels: vec!["background".into(), "fg".into()],
            inference,
            preprocess: PreprocessSpec {
                reorient: true,
                target_spacing: spacing.map(|s| [s; 3]),
                normalization: Normalization::None,
            },
            postprocess: Default::default(),
        }
    }

    fn sw(roi: usize) -> InferenceMode {
        InferenceMode::SlidingWindow(SlidingWindow {
            roi: [roi; 3],
            overlap: 0.5,
            ..SlidingWindow::default()
        })
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_plan_counts_every_large_array() {
        let model = FnModel::pointwise(1, 2, |_, x| x);
        let vol = volume([20, 20, 20], 1.0);
        let p = plan(&vol, &manifest(sw(8), Some(2.0)), &model, 4).unwrap();
        assert_eq!(p.model_dims, [10, 10, 10]);
        assert_eq!(p.input, 8000 * 4);
        assert_eq!(p.model_voxels, 1000);
        // Model input, two class sums and the weight.
        assert_eq!(p.blending, 4 * 1000 * 4);
        assert_eq!(p.importance, 512 * 4);
        // 2 windows per axis at overlap 0.5; 4 windows of 1 + 2 channels.
        assert_eq!(p.windows, 8 * 24);
        assert_eq!(p.batch, 4 * 3 * 512 * 4);
        assert_eq!(p.resampling, 2 * 2 * 8000 * 4);
        assert!(p.peak() > p.input + p.blending);
        check(&vol, &manifest(sw(8), Some(2.0)), &model, 4, 1 << 20, GIB).unwrap();
    }

    #[test]
    fn a_huge_window_is_refused_before_it_is_allocated() {
        let model = FnModel::pointwise(1, 2, |_, x| x);
        let vol = volume([20, 20, 20], 1.0);
        // The repro of issue 21: `--roi 1000 1000 1000`, roi 100000.
        for roi in [1000, 100_000] {
            let e = check(&vol, &manifest(sw(roi), None), &model, 4, 1 << 30, 12 * GIB)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("limits.memory_budget_mb = 12288 MiB") && e.contains("model.roi"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_tiny_spacing_is_refused_by_max_voxels_and_the_budget() {
        let model = FnModel::pointwise(1, 2, |_, x| x);
        // 181 x 217 x 181 at 1 mm to 0.01 mm: 7e12 voxels (the issue's
        // "memory allocation of 420032602080 bytes failed").
        let vol = volume([181, 217, 181], 1.0);
        let m = manifest(sw(64), Some(0.01));
        let e = check(&vol, &m, &model, 4, 1 << 28, 12 * GIB).unwrap_err();
        assert!(matches!(e, BudgetError::TooManyVoxels { .. }), "{e}");
        let e = e.to_string();
        assert!(
            e.contains("limits.max_voxels") && e.contains("model.spacing"),
            "{e}"
        );
        let e = check(&vol, &m, &model, 4, u64::MAX, 12 * GIB).unwrap_err();
        assert!(matches!(e, BudgetError::OverBudget { .. }), "{e}");
    }

    #[test]
    fn slabs_count_slices_and_the_in_plane_window() {
        let model = FnModel::pointwise(1, 2, |_, x| x);
        let vol = volume([16, 16, 10], 1.0);
        let slab = InferenceMode::Slab(Slab {
            depth: 3,
            roi_xy: Some([8, 0]),
            overlap: 0.5,
            ..Slab::default()
        });
        let p = plan(&vol, &manifest(slab, None), &model, 2).unwrap();
        // 3 x 1 windows per slice, 10 slices; in-plane window 8 x 16.
        assert_eq!(p.windows, 30 * 24);
        assert_eq!(p.importance, 128 * 4);
        assert_eq!(p.batch, 2 * (3 * 128 + 2 * 128) * 4);
    }
}
