//! MONAI-equivalent sliding-window inference.
//!
//! Reproduces `monai.inferers.sliding_window_inference` (with
//! `compute_importance_map`, `_get_scan_interval` and `dense_patch_slices`):
//! the same padding, window placement, importance map (computed in f32, as
//! MONAI does through torch) and f32 blending, so a model deployed here gives
//! the numbers it gave in MONAI.
//!
//! Unlike MONAI, the padded image is never materialised: windows are filled
//! straight from the input (padding values where they stick out) and only the
//! voxels inside the image are accumulated. Voxels in the padding are cropped
//! by MONAI at the end, and every voxel is blended independently, so the
//! result is the same while memory stays at the output plus one weight map.

use ndarray::{Array4, ArrayView4};
use serde::{Deserialize, Serialize};

use super::InferenceError;
use super::batch::*;
use super::blend::*;
use super::check::*;
use super::grid::*;
use crate::backend::Model;

// The public paths of the helpers this scheme shares with slab.rs.
pub use super::blend::{Accumulator, BlendMode, importance_map};
pub use super::grid::{scan_interval, window_starts};

/// Settings of a 3D sliding-window run (MONAI's `sliding_window_inference`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlidingWindow {
    /// Window size along X, Y, Z. A 0 takes the image's size on that axis,
    /// as MONAI does for non-positive sizes.
    pub roi: [usize; 3],
    /// Fraction of a window shared with its neighbour, in `[0, 1)`.
    pub overlap: f64,
    pub mode: BlendMode,
    /// Gaussian sigma as a fraction of the window size (Gaussian mode only).
    pub sigma_scale: f64,
    /// Windows per model call. Ignored when the model's batch size is fixed.
    pub batch_size: usize,
    /// Value of the voxels a window covers outside the image.
    pub pad_value: f32,
}

impl Default for SlidingWindow {
    fn default() -> Self {
        SlidingWindow {
            roi: [96, 96, 96],
            overlap: 0.5,
            mode: BlendMode::Gaussian,
            sigma_scale: 0.125,
            batch_size: 4,
            pad_value: 0.0,
        }
    }
}

impl SlidingWindow {
    /// Checks the settings that do not depend on the image or the model.
    pub fn validate(&self) -> Result<(), InferenceError> {
        validate_blend(self.overlap, self.mode, self.sigma_scale, self.batch_size)
    }

    /// Runs `model` over `image` (`[C, X, Y, Z]`) window by window and returns
    /// the blended predictions (`[K, X, Y, Z]`, K = the model's output
    /// channels). `progress(done, total)` is called after every batch.
    ///
    /// The model must take `[B, C, rx, ry, rz]` and return `[B, K, rx, ry, rz]`;
    /// fixed dimensions it declares are checked against the image and `roi`
    /// before anything runs. A fixed batch size `b` is honoured by sending
    /// exactly `b` windows per call, the last call padded with zero windows
    /// whose outputs are ignored.
    pub fn run(
        &self,
        image: ArrayView4<'_, f32>,
        model: &dyn Model,
        progress: &dyn Fn(u64, u64),
    ) -> Result<Array4<f32>, InferenceError> {
        self.validate()?;
        let (channels, dims) = image_dims(image.shape())?;
        let roi = resolve_roi(self.roi, dims);
        check_input(model.input(), channels, roi)?;
        let fixed_classes = check_output_info(model.output(), &roi)?;

        let origins: [Vec<isize>; 3] =
            std::array::from_fn(|a| axis_origins(dims[a], roi[a], self.overlap));
        // MONAI's order (`np.meshgrid(..., indexing="ij")`): X slowest, Z fastest.
        // It matters only for the f32 rounding of the sums, but that is what
        // lets results match MONAI's to the last few bits.
        let mut windows = Vec::with_capacity(origins.iter().map(Vec::len).product());
        for &x in &origins[0] {
            for &y in &origins[1] {
                for &z in &origins[2] {
                    windows.push([x, y, z]);
                }
            }
        }

        let importance = importance_nd(&roi, self.mode, self.sigma_scale);
        let image = image.as_standard_layout();
        let src = image
            .as_slice()
            .ok_or_else(|| InferenceError::Image("image is not contiguous".into()))?;
        let window_len: usize = roi.iter().product();
        let batch = BatchPlan::new(model.input(), self.batch_size, windows.len())?;
        let item_shape = [channels, roi[0], roi[1], roi[2]];
        let pad = self.pad_value;

        let mut acc: Option<Accumulator> = None;
        run_batches(
            model,
            batch,
            &item_shape,
            windows.len(),
            |i, dst| extract_window(src, channels, dims, windows[i], roi, pad, dst),
            |first, n, sent, out| {
                let classes = output_classes(model.output(), out.shape(), sent, &roi)?;
                let acc = classes_accumulator(&mut acc, classes, fixed_classes, dims, model)?;
                let per_window = classes * window_len;
                for (j, pred) in out.data().chunks_exact(per_window).take(n).enumerate() {
                    acc.add(windows[first + j], roi, pred, &importance)?;
                }
                Ok(())
            },
            progress,
        )?;
        acc.ok_or_else(|| InferenceError::Image("no window was run".into()))?
            .into_output()
    }
}

/// Copies the window at `origin` out of `src` (`[C, X, Y, Z]`, C order) into
/// `dst` (`[C, rx, ry, rz]`), with `pad` where the window leaves the image.
fn extract_window(
    src: &[f32],
    channels: usize,
    dims: [usize; 3],
    origin: [isize; 3],
    roi: [usize; 3],
    pad: f32,
    dst: &mut [f32],
) {
    let spans: [Span; 3] = std::array::from_fn(|a| clip(origin[a], roi[a], dims[a]));
    if spans.iter().zip(&roi).any(|(s, &r)| s.len != r) {
        dst.fill(pad);
    }
    let voxels: usize = dims.iter().product();
    let window_len: usize = roi.iter().product();
    for c in 0..channels {
        let src = &src[c * voxels..(c + 1) * voxels];
        let dst = &mut dst[c * window_len..(c + 1) * window_len];
        for_each_row(dims, roi, &spans, |img, win, len| {
            dst[win..win + len].copy_from_slice(&src[img..img + len]);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::test_util::{FnModel, info};
    use ndarray::{Array, Array4};

    fn run_sw(sw: &SlidingWindow, image: &Array4<f32>, model: &dyn Model) -> Array4<f32> {
        sw.run(image.view(), model, &|_, _| {}).unwrap()
    }

    fn assert_close(a: &Array4<f32>, b: &Array4<f32>, tol: f32) {
        assert_eq!(a.shape(), b.shape());
        for ((idx, &x), &y) in a.indexed_iter().zip(b.iter()) {
            assert!((x - y).abs() <= tol, "at {idx:?}: {x} vs {y}");
        }
    }

    fn ramp(shape: (usize, usize, usize, usize)) -> Array4<f32> {
        Array::from_shape_fn(shape, |(c, i, j, k)| {
            ((c * 7 + i * 3 + j * 5 + k * 11) % 17) as f32 - 8.0
        })
    }

    #[test]
    fn image_smaller_than_roi_gets_one_centred_window() {
        assert_eq!(scan_interval(10, 16, 0.5), 16);
        assert_eq!(axis_starts(10, 16, 0.5), vec![0]);
        // (16 - 10) / 2 = 3 voxels of padding before the image.
        assert_eq!(axis_origins(10, 16, 0.5), vec![-3]);
        // Odd difference: the extra voxel goes after.
        assert_eq!(axis_origins(9, 12, 0.5), vec![-1]);
        assert_eq!(
            window_starts([10, 16, 40], [16, 16, 16], 0.25).unwrap(),
            vec![[0, 0, 0], [0, 0, 12], [0, 0, 24]]
        );
    }

    #[test]
    fn last_window_ends_at_the_edge() {
        // roi 16, overlap 0.25: interval 12; third window moved back from 24 to 21.
        assert_eq!(axis_starts(37, 16, 0.25), vec![0, 12, 21]);
        assert_eq!(axis_starts(40, 16, 0.25), vec![0, 12, 24]);
        // Odd roi: int(15 * 0.5) = 7.
        assert_eq!(axis_starts(30, 15, 0.5), vec![0, 7, 14, 15]);
        // Even roi, exact fit.
        assert_eq!(axis_starts(32, 16, 0.5), vec![0, 8, 16]);
        assert_eq!(axis_starts(16, 16, 0.5), vec![0]);
    }

    #[test]
    fn window_counts_match_the_window_lists() {
        for size in 1..60 {
            for roi in [1, 2, 7, 16, 64] {
                for overlap in [0.0, 0.25, 0.5, 0.9] {
                    assert_eq!(
                        axis_window_count(size, roi, overlap),
                        axis_starts(size, roi, overlap).len(),
                        "{size} {roi} {overlap}"
                    );
                }
            }
        }
    }

    #[test]
    fn overlap_zero_and_high() {
        assert_eq!(axis_starts(24, 8, 0.0), vec![0, 8, 16]);
        assert_eq!(axis_starts(25, 8, 0.0), vec![0, 8, 16, 17]);
        // 10 * (1 - 0.9) is 0.999..., which int() truncates to 0, then 1.
        assert_eq!(scan_interval(30, 10, 0.9), 1);
        assert_eq!(axis_starts(13, 10, 0.9), vec![0, 1, 2, 3]);
        assert_eq!(scan_interval(30, 11, 0.9), 1);
        assert_eq!(scan_interval(100, 64, 0.5), 32);
        assert!(window_starts([8, 8, 8], [4, 4, 4], 1.0).is_err());
        assert!(window_starts([8, 8, 8], [4, 4, 4], -0.1).is_err());
        assert!(window_starts([8, 8, 8], [4, 4, 4], f64::NAN).is_err());
    }

    #[test]
    fn window_order_is_x_slowest() {
        let w = window_starts([12, 12, 12], [8, 8, 8], 0.5).unwrap();
        assert_eq!(w.len(), 8);
        assert_eq!(w[0], [0, 0, 0]);
        assert_eq!(w[1], [0, 0, 4]);
        assert_eq!(w[2], [0, 4, 0]);
        assert_eq!(w[4], [4, 0, 0]);
    }

    #[test]
    fn importance_maps() {
        let c = importance_map([3, 4, 5], BlendMode::Constant, 0.125);
        assert!(c.iter().all(|&v| v == 1.0));
        let g = importance_map([9, 8, 7], BlendMode::Gaussian, 0.125);
        // Odd axes peak at exactly 1 in the centre; the even one is symmetric.
        assert_eq!(g[[4, 3, 3]], g[[4, 4, 3]]);
        // sigma = 1 on the even axis, whose centre voxels sit 0.5 off centre.
        assert!((g[[4, 3, 3]] - (-0.125f32).exp()).abs() < 1e-6);
        assert_eq!(g[[0, 0, 0]], g[[8, 7, 6]]);
        // sigma = 0.125 * roi makes the corners tiny: clamped to 1e-3.
        assert_eq!(g[[0, 0, 0]], 1e-3f32);
        let wide = importance_map([9, 9, 9], BlendMode::Gaussian, 1.0);
        let min = wide.iter().copied().fold(f32::INFINITY, f32::min);
        assert!(min > 1e-3 && min == wide[[0, 0, 0]]);
    }

    #[test]
    fn pointwise_model_is_reproduced() {
        // out = 2x + c: any blending of identical predictions gives it back.
        let model = FnModel::pointwise(1, 2, |c, x| 2.0 * x + c as f32);
        let image = ramp((1, 13, 9, 20));
        for mode in [BlendMode::Constant, BlendMode::Gaussian] {
            let sw = SlidingWindow {
                roi: [8, 12, 6],
                overlap: 0.5,
                mode,
                batch_size: 3,
                ..SlidingWindow::default()
            };
            let out = run_sw(&sw, &image, &model);
            assert_eq!(out.shape(), &[2, 13, 9, 20]);
            for ((c, i, j, k), &v) in out.indexed_iter() {
                let want = 2.0 * image[[0, i, j, k]] + c as f32;
                assert!(
                    (v - want).abs() < 1e-5,
                    "{mode:?} {c},{i},{j},{k}: {v} vs {want}"
                );
            }
        }
    }

    #[test]
    fn padding_uses_pad_value() {
        // A model that reports, per window voxel, the input value: windows
        // bigger than the image must see pad_value around it, which the
        // crop then removes, so the output is still the image.
        let seen_pad = std::sync::Mutex::new(false);
        let model = FnModel::new(
            info(&[None, Some(1), None, None, None]),
            info(&[None, Some(1), None, None, None]),
            |data, shape| {
                if data.contains(&-5.0) {
                    *seen_pad.lock().unwrap() = true;
                }
                (shape.to_vec(), data.to_vec())
            },
        );
        let image = Array4::from_elem((1, 3, 4, 5), 1.0f32);
        let sw = SlidingWindow {
            roi: [6, 6, 6],
            pad_value: -5.0,
            ..SlidingWindow::default()
        };
        let out = run_sw(&sw, &image, &model);
        assert!(out.iter().all(|&v| (v - 1.0).abs() < 1e-6));
        assert!(*seen_pad.lock().unwrap());
    }

    #[test]
    fn fixed_batch_pads_the_last_call() {
        // 12 x 12 x 10 with roi 8 and overlap 0.5: 2 x 2 x 2 windows, so a
        // model fixed at batch 4 gets two full calls whatever batch_size says.
        let input = info(&[Some(4), Some(1), None, None, None]);
        let output = info(&[Some(4), Some(2), None, None, None]);
        let fixed = FnModel::new(input, output, |data, shape| {
            let mut out = Vec::with_capacity(data.len() * 2);
            let n: usize = shape[2..].iter().product();
            for item in data.chunks(n) {
                out.extend(item.iter().map(|&x| x * 3.0));
                out.extend(item.iter().map(|&x| x - 1.0));
            }
            (vec![shape[0], 2, shape[2], shape[3], shape[4]], out)
        });
        let free = FnModel::pointwise(1, 2, |c, x| if c == 0 { x * 3.0 } else { x - 1.0 });
        let image = ramp((1, 12, 12, 10)) + 20.0;
        let sw = SlidingWindow {
            roi: [8, 8, 8],
            overlap: 0.5,
            batch_size: 3,
            ..SlidingWindow::default()
        };
        assert_eq!(
            window_starts([12, 12, 10], [8, 8, 8], 0.5).unwrap().len(),
            8
        );
        let a = run_sw(&sw, &image, &fixed);
        let b = run_sw(&sw, &image, &free);
        assert_eq!(a, b);
        let calls = fixed.calls();
        assert_eq!(calls.len(), 2);
        assert!(calls.iter().all(|c| c[0] == 4), "{calls:?}");

        // 6 windows, batch fixed at 5: the second call carries 1 window and
        // 4 zero windows, whose outputs must not reach the result.
        let input = info(&[Some(5), Some(1), None, None, None]);
        let zero_items = std::sync::Mutex::new(Vec::new());
        let fixed = FnModel::new(input, info(&[None; 5]), |data, shape| {
            let n: usize = shape[1..].iter().product();
            let zeros = data
                .chunks(n)
                .filter(|w| w.iter().all(|&v| v == 0.0))
                .count();
            zero_items.lock().unwrap().push(zeros);
            // Garbage in the padded slots shows if they were blended.
            let mut out = data.to_vec();
            for (i, item) in out.chunks_mut(n).enumerate() {
                if item.iter().all(|&v| v == 0.0) {
                    item.fill(1e6 + i as f32);
                }
            }
            (shape.to_vec(), out)
        });
        let image = ramp((1, 8, 12, 16)) + 20.0;
        let sw = SlidingWindow {
            roi: [8, 8, 8],
            overlap: 0.5,
            mode: BlendMode::Constant,
            ..SlidingWindow::default()
        };
        assert_eq!(window_starts([8, 12, 16], [8, 8, 8], 0.5).unwrap().len(), 6);
        let out = run_sw(&sw, &image, &fixed);
        assert_close(&out, &image, 1e-5);
        assert_eq!(fixed.calls().len(), 2);
        assert_eq!(*zero_items.lock().unwrap(), vec![0, 4]);
    }

    #[test]
    fn progress_counts_windows() {
        let model = FnModel::pointwise(1, 1, |_, x| x);
        let image = ramp((1, 16, 16, 16));
        let sw = SlidingWindow {
            roi: [8, 8, 8],
            overlap: 0.5,
            batch_size: 4,
            ..SlidingWindow::default()
        };
        let seen = std::cell::RefCell::new(Vec::new());
        sw.run(image.view(), &model, &|d, t| seen.borrow_mut().push((d, t)))
            .unwrap();
        // 3 starts per axis: 27 windows in batches of 4.
        let seen = seen.into_inner();
        assert_eq!(seen.len(), 7);
        assert_eq!(seen[0], (4, 27));
        assert_eq!(*seen.last().unwrap(), (27, 27));
    }

    #[test]
    fn wrong_model_shapes_are_refused() {
        let image = ramp((2, 10, 10, 10));
        let sw = SlidingWindow {
            roi: [8, 8, 8],
            ..SlidingWindow::default()
        };
        let copy = |data: &[f32], shape: &[usize]| (shape.to_vec(), data.to_vec());
        let err = |model: &FnModel| {
            sw.run(image.view(), model, &|_, _| {})
                .unwrap_err()
                .to_string()
        };

        let rank4 = FnModel::new(info(&[None, Some(2), None, None]), info(&[None; 5]), copy);
        assert!(err(&rank4).contains("rank 5"), "{}", err(&rank4));

        let channels = FnModel::new(
            info(&[None, Some(1), None, None, None]),
            info(&[None; 5]),
            copy,
        );
        let e = err(&channels);
        assert!(
            e.contains("expects 1 input channels, the image has 2"),
            "{e}"
        );

        let spatial = FnModel::new(
            info(&[None, Some(2), Some(16), Some(16), Some(16)]),
            info(&[None; 5]),
            copy,
        );
        let e = err(&spatial);
        assert!(e.contains("[16, 16, 16]") && e.contains("[8, 8, 8]"), "{e}");

        let out_rank = FnModel::new(info(&[None; 5]), info(&[None; 4]), copy);
        assert!(err(&out_rank).contains("rank"));

        // Declared fine, but returns windows of the wrong size.
        let shrinks = FnModel::new(
            info(&[None; 5]),
            info(&[None; 5]),
            |data: &[f32], shape: &[usize]| {
                let mut s = shape.to_vec();
                s[4] -= 1;
                let n = s.iter().product();
                (s, data[..n].to_vec())
            },
        );
        let e = err(&shrinks);
        assert!(e.contains("expected shape"), "{e}");

        // Returns fewer items than it was given.
        let drops = FnModel::new(
            info(&[None; 5]),
            info(&[None; 5]),
            |data: &[f32], shape: &[usize]| {
                let mut s = shape.to_vec();
                s[0] = 1;
                let n = s.iter().product();
                (s, data[..n].to_vec())
            },
        );
        let sw4 = SlidingWindow {
            batch_size: 4,
            ..sw.clone()
        };
        let e = sw4
            .run(image.view(), &drops, &|_, _| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("batch of 4"), "{e}");

        // Declares 3 classes, returns 2.
        let classes = FnModel::new(
            info(&[None; 5]),
            info(&[None, Some(3), None, None, None]),
            copy,
        );
        let e = err(&classes);
        assert!(e.contains("expected 3"), "{e}");

        // Bad settings.
        let bad = SlidingWindow {
            overlap: 1.0,
            ..sw.clone()
        };
        assert!(matches!(
            bad.run(image.view(), &classes, &|_, _| {}),
            Err(InferenceError::Settings(_))
        ));
        let bad = SlidingWindow {
            batch_size: 0,
            ..sw.clone()
        };
        assert!(matches!(
            bad.run(image.view(), &classes, &|_, _| {}),
            Err(InferenceError::Settings(_))
        ));
        let empty = Array4::<f32>::zeros((1, 0, 4, 4));
        assert!(matches!(
            sw.run(empty.view(), &classes, &|_, _| {}),
            Err(InferenceError::Image(_))
        ));
    }

    #[test]
    fn backend_errors_pass_through() {
        let failing = FnModel::failing();
        let image = ramp((1, 8, 8, 8));
        let e = SlidingWindow {
            roi: [8, 8, 8],
            ..SlidingWindow::default()
        }
        .run(image.view(), &failing, &|_, _| {})
        .unwrap_err();
        assert!(matches!(e, InferenceError::Backend(_)), "{e}");
    }

    #[test]
    fn roi_zero_takes_the_image_size() {
        let model = FnModel::pointwise(1, 1, |_, x| x);
        let image = ramp((1, 6, 7, 8));
        let sw = SlidingWindow {
            roi: [0, 4, 0],
            mode: BlendMode::Constant,
            ..SlidingWindow::default()
        };
        assert_close(&run_sw(&sw, &image, &model), &image, 1e-5);
        assert!(model.calls().iter().all(|c| c[2..] == [6, 4, 8]));
    }

    #[test]
    fn non_standard_layout_input() {
        let model = FnModel::pointwise(1, 1, |_, x| x + 1.0);
        let image = ramp((1, 9, 10, 11));
        let mut flipped = image.clone();
        flipped.invert_axis(ndarray::Axis(3));
        let sw = SlidingWindow {
            roi: [4, 4, 4],
            ..SlidingWindow::default()
        };
        let out = run_sw(&sw, &flipped, &model);
        for ((_, i, j, k), &v) in out.indexed_iter() {
            assert!((v - flipped[[0, i, j, k]] - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn settings_deserialize_with_defaults() {
        let sw: SlidingWindow =
            serde_json::from_str(r#"{"roi": [64, 64, 32], "mode": "constant"}"#).unwrap();
        assert_eq!(sw.roi, [64, 64, 32]);
        assert_eq!(sw.mode, BlendMode::Constant);
        assert_eq!(sw.sigma_scale, 0.125);
        assert_eq!(sw.pad_value, 0.0);
        let json = serde_json::to_string(&SlidingWindow::default()).unwrap();
        assert!(json.contains(r#""mode":"gaussian""#), "{json}");
    }

    #[test]
    fn accumulator_checks_lengths_and_skips_outside() {
        let mut acc = Accumulator::new(1, [4, 4, 4]);
        assert!(acc.add([0, 0, 0], [2, 2, 2], &[1.0; 7], &[1.0; 8]).is_err());
        // Entirely outside: nothing happens.
        acc.add([10, 0, 0], [2, 2, 2], &[1.0; 8], &[1.0; 8])
            .unwrap();
        acc.add([-1, -1, -1], [2, 2, 2], &[2.0; 8], &[0.5; 8])
            .unwrap();
        let out = acc.into_output().unwrap();
        assert_eq!(out[[0, 0, 0, 0]], 2.0);
        assert!(out[[0, 1, 1, 1]].is_nan());
    }
}
