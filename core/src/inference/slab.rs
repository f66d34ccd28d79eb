//! 2.5D slab inference (TransSeg-style): a 2D model segments each slice along
//! the last axis (Z) from a slab of its neighbours.
//!
//! Slice `z` is predicted from the `depth` slices `z - depth/2 ..
//! z - depth/2 + depth - 1`, clamped to the volume (edge slices repeat). When
//! the in-plane window is smaller than the slice, the slice is tiled with
//! MONAI's 2D sliding-window rules (padding, scan interval, Gaussian or
//! constant blending), so a slab run equals running MONAI's 2D
//! `sliding_window_inference` on every slab.

use ndarray::{Array4, ArrayView4};
use serde::{Deserialize, Serialize};

use super::InferenceError;
use super::batch::{BatchPlan, run_batches};
use super::blend::{Accumulator, BlendMode, classes_accumulator, importance_nd, validate_blend};
use super::check::{check_output_info, fmt_dims, image_dims, output_classes};
use super::grid::{Span, axis_origins, clip};
use crate::backend::{Model, TensorInfo};

/// Settings of a 2.5D slab run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Slab {
    /// Slices per slab (odd or even; the predicted slice is at index
    /// `depth / 2` of the slab).
    pub depth: usize,
    /// In-plane window (X, Y). `None`: the model's fixed in-plane size where
    /// it has one, else the whole slice. A 0 takes the slice's size.
    pub roi_xy: Option<[usize; 2]>,
    /// Overlap of in-plane windows, in `[0, 1)`.
    pub overlap: f64,
    pub mode: BlendMode,
    pub sigma_scale: f64,
    /// Windows (slices x in-plane windows) per model call. Ignored when the
    /// model's batch size is fixed.
    pub batch_size: usize,
    /// Value of the voxels an in-plane window covers outside the slice.
    pub pad_value: f32,
}

impl Default for Slab {
    fn default() -> Self {
        Slab {
            depth: 3,
            roi_xy: None,
            overlap: 0.5,
            mode: BlendMode::Gaussian,
            sigma_scale: 0.125,
            batch_size: 8,
            pad_value: 0.0,
        }
    }
}

/// How the model takes a slab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InputLayout {
    /// `[B, C, D, rx, ry]`.
    Stacked,
    /// `[B, C * D, rx, ry]`, channel `c * D + d`: the same memory as
    /// `Stacked`, only the shape differs.
    Flat,
}

impl Slab {
    /// Checks the settings that do not depend on the image or the model.
    pub fn validate(&self) -> Result<(), InferenceError> {
        validate_blend(self.overlap, self.mode, self.sigma_scale, self.batch_size)?;
        if self.depth == 0 {
            return Err(InferenceError::Settings(
                "slab depth must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// Runs `model` over every slice of `image` (`[C, X, Y, Z]`) and returns
    /// the blended predictions `[K, X, Y, Z]`. `progress(done, total)` counts
    /// windows (slices times in-plane windows) after every batch.
    ///
    /// The model takes `[B, C, D, rx, ry]` or `[B, C * D, rx, ry]` and returns
    /// `[B, K, rx, ry]` or `[B, K, 1, rx, ry]`. Batches mix slices and
    /// in-plane windows; a fixed batch size is honoured as in
    /// [`SlidingWindow::run`](super::SlidingWindow::run).
    pub fn run(
        &self,
        image: ArrayView4<'_, f32>,
        model: &dyn Model,
        progress: &dyn Fn(u64, u64),
    ) -> Result<Array4<f32>, InferenceError> {
        self.validate()?;
        let (channels, dims) = image_dims(image.shape())?;
        let [nx, ny, nz] = dims;
        let depth = self.depth;
        let (layout, roi) = self.plan_input(model.input(), channels, [nx, ny])?;
        let fixed_classes = check_slab_output(model.output(), roi)?;

        let xs = axis_origins(nx, roi[0], self.overlap);
        let ys = axis_origins(ny, roi[1], self.overlap);
        let planes: Vec<[isize; 2]> = xs
            .iter()
            .flat_map(|&x| ys.iter().map(move |&y| [x, y]))
            .collect();
        let per_slice = planes.len();
        let total = nz * per_slice;

        let importance = importance_nd(&roi, self.mode, self.sigma_scale);
        let image = image.as_standard_layout();
        let src = image
            .as_slice()
            .ok_or_else(|| InferenceError::Image("image is not contiguous".into()))?;
        let batch = BatchPlan::new(model.input(), self.batch_size, total)?;
        let item_shape = match layout {
            InputLayout::Stacked => vec![channels, depth, roi[0], roi[1]],
            InputLayout::Flat => vec![channels * depth, roi[0], roi[1]],
        };
        let pad = self.pad_value;
        let window_len = roi[0] * roi[1];

        // One slice is blended at a time (windows come slice by slice), then
        // written into its Z position of the output.
        let mut acc: Option<Accumulator> = None;
        let mut out: Vec<f32> = Vec::new();
        let mut current_z = 0;
        run_batches(
            model,
            batch,
            &item_shape,
            total,
            |i, dst| {
                let (z, plane) = (i / per_slice, planes[i % per_slice]);
                extract_slab(src, channels, dims, z, plane, depth, roi, pad, dst);
            },
            |first, n, sent, t| {
                let spatial: &[usize] = if t.shape().len() == 5 {
                    &[1, roi[0], roi[1]]
                } else {
                    &roi
                };
                let classes = output_classes(model.output(), t.shape(), sent, spatial)?;
                let acc =
                    classes_accumulator(&mut acc, classes, fixed_classes, [nx, ny, 1], model)?;
                if out.is_empty() {
                    out = vec![0.0; classes * nx * ny * nz];
                }
                let per_window = classes * window_len;
                for (j, pred) in t.data().chunks_exact(per_window).take(n).enumerate() {
                    let i = first + j;
                    let z = i / per_slice;
                    if z != current_z {
                        write_slice(acc, &mut out, dims, current_z);
                        current_z = z;
                    }
                    let [px, py] = planes[i % per_slice];
                    acc.add([px, py, 0], [roi[0], roi[1], 1], pred, &importance)?;
                }
                Ok(())
            },
            progress,
        )?;
        let mut acc = acc.ok_or_else(|| InferenceError::Image("no slab was run".into()))?;
        write_slice(&mut acc, &mut out, dims, current_z);
        Array4::from_shape_vec((acc.classes(), nx, ny, nz), out)
            .map_err(|e| InferenceError::Shape(e.to_string()))
    }

    /// The model's input layout and the in-plane window, checked against the
    /// image and the settings.
    fn plan_input(
        &self,
        info: &TensorInfo,
        channels: usize,
        slice: [usize; 2],
    ) -> Result<(InputLayout, [usize; 2]), InferenceError> {
        let err = |reason: String| InferenceError::ModelInput {
            model: info.to_string(),
            reason,
        };
        let depth = self.depth;
        let (layout, plane) = match info.rank() {
            5 => {
                if let Some(c) = info.shape[1].fixed().filter(|&c| c != channels) {
                    return Err(err(format!(
                        "the model expects {c} input channels, the image has {channels}"
                    )));
                }
                if let Some(d) = info.shape[2].fixed().filter(|&d| d != depth) {
                    return Err(err(format!(
                        "the model takes slabs of {d} slices, depth is {depth}"
                    )));
                }
                (InputLayout::Stacked, &info.shape[3..])
            }
            4 => {
                let want = channels * depth;
                if let Some(cd) = info.shape[1].fixed().filter(|&cd| cd != want) {
                    return Err(err(format!(
                        "the model takes {cd} input channels (channels x depth), \
                         the image gives {channels} channels x depth {depth} = {want}"
                    )));
                }
                (InputLayout::Flat, &info.shape[2..])
            }
            r => {
                return Err(err(format!(
                    "slab inference feeds [batch, channels, depth, x, y] (rank 5) or \
                     [batch, channels * depth, x, y] (rank 4), the model takes rank {r}"
                )));
            }
        };
        let model_xy = [plane[0].fixed(), plane[1].fixed()];
        let roi: [usize; 2] = std::array::from_fn(|a| match self.roi_xy {
            Some(r) if r[a] > 0 => r[a],
            Some(_) => slice[a],
            None => model_xy[a].unwrap_or(slice[a]),
        });
        if model_xy
            .iter()
            .zip(&roi)
            .any(|(m, &r)| m.is_some_and(|m| m != r))
        {
            return Err(err(format!(
                "the model takes slices of {} voxels but roi_xy is {roi:?}",
                fmt_dims(plane)
            )));
        }
        Ok((layout, roi))
    }
}

/// Checks the declared output is `[B, K, rx, ry]` or `[B, K, 1, rx, ry]`;
/// returns K when fixed.
fn check_slab_output(info: &TensorInfo, roi: [usize; 2]) -> Result<Option<usize>, InferenceError> {
    match info.rank() {
        4 => check_output_info(info, &roi),
        5 => check_output_info(info, &[1, roi[0], roi[1]]),
        r => Err(InferenceError::ModelOutput {
            model: info.to_string(),
            reason: format!(
                "slab inference expects [batch, classes, x, y] or [batch, classes, 1, x, y], \
                 the model declares rank {r}"
            ),
        }),
    }
}

/// Writes the blended slice `z` held by `acc` (`[K, X, Y, 1]`) into `out`
/// (`[K, X, Y, Z]`, C order) and clears `acc` for the next slice.
fn write_slice(acc: &mut Accumulator, out: &mut [f32], dims: [usize; 3], z: usize) {
    let [nx, ny, nz] = dims;
    let plane = nx * ny;
    acc.drain(|k, v, value| out[(k * plane + v) * nz + z] = value);
}

/// Copies the slab of slice `z`, in-plane window at `origin`, out of `src`
/// (`[C, X, Y, Z]`, C order) into `dst` (`[C, D, rx, ry]`), with `pad` where
/// the window leaves the slice.
#[allow(clippy::too_many_arguments)]
fn extract_slab(
    src: &[f32],
    channels: usize,
    dims: [usize; 3],
    z: usize,
    origin: [isize; 2],
    depth: usize,
    roi: [usize; 2],
    pad: f32,
    dst: &mut [f32],
) {
    let [nx, ny, nz] = dims;
    let sx: Span = clip(origin[0], roi[0], nx);
    let sy: Span = clip(origin[1], roi[1], ny);
    if sx.len != roi[0] || sy.len != roi[1] {
        dst.fill(pad);
    }
    let plane = roi[0] * roi[1];
    let half = depth / 2;
    for c in 0..channels {
        for d in 0..depth {
            let zs = (z + d).saturating_sub(half).min(nz - 1);
            let dst = &mut dst[(c * depth + d) * plane..][..plane];
            for i in 0..sx.len {
                let row = &mut dst[(sx.win + i) * roi[1] + sy.win..][..sy.len];
                // Z is the fastest axis of the image, so a slice is gathered
                // with a stride of Z.
                let base = ((c * nx + sx.img + i) * ny + sy.img) * nz + zs;
                for (j, v) in row.iter_mut().enumerate() {
                    *v = src[base + j * nz];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::SlidingWindow;
    use crate::inference::test_util::{FnModel, info};
    use ndarray::Array;

    /// Image whose voxel value is `100 * c + z`, so a sum of slab values
    /// tells which slices were fed.
    fn z_image(c: usize, x: usize, y: usize, z: usize) -> Array4<f32> {
        Array::from_shape_fn((c, x, y, z), |(c, _, _, z)| (100 * c + z) as f32)
    }

    /// Rank-5 model `[B, C, D, x, y] -> [B, 1, x, y]`: the sum over C and D.
    fn summing_model<'a>() -> FnModel<'a> {
        FnModel::new(
            info(&[None, None, None, None, None]),
            info(&[None, Some(1), None, None]),
            |data, shape| {
                let plane = shape[3] * shape[4];
                let item = shape[1] * shape[2] * plane;
                let mut out = vec![0.0; shape[0] * plane];
                for (b, x) in data.chunks(item).enumerate() {
                    for v in x.chunks(plane) {
                        for (o, &v) in out[b * plane..(b + 1) * plane].iter_mut().zip(v) {
                            *o += v;
                        }
                    }
                }
                (vec![shape[0], 1, shape[3], shape[4]], out)
            },
        )
    }

    fn clamped_sum(z: usize, depth: usize, nz: usize) -> f32 {
        (0..depth)
            .map(|d| (z + d).saturating_sub(depth / 2).min(nz - 1) as f32)
            .sum()
    }

    #[test]
    fn slabs_clamp_at_the_edges() {
        let image = z_image(1, 4, 5, 6);
        for depth in [1, 2, 3, 4, 5] {
            let slab = Slab {
                depth,
                ..Slab::default()
            };
            let model = summing_model();
            let out = slab.run(image.view(), &model, &|_, _| {}).unwrap();
            assert_eq!(out.shape(), &[1, 4, 5, 6]);
            for z in 0..6 {
                let want = clamped_sum(z, depth, 6);
                assert!(
                    out.slice(ndarray::s![0, .., .., z])
                        .iter()
                        .all(|&v| (v - want).abs() < 1e-4),
                    "depth {depth} z {z}: want {want}, got {:?}",
                    out[[0, 0, 0, z]]
                );
            }
        }
        // depth 3, z = 0: slices 0, 0, 1; depth 4, z = 5 of 6: 3, 4, 5, 5.
        assert_eq!(clamped_sum(0, 3, 6), 1.0);
        assert_eq!(clamped_sum(5, 4, 6), 17.0);
    }

    #[test]
    fn rank4_model_sees_channel_major_slabs() {
        // [B, C*D, x, y] -> [B, 1, 1, x, y]: sum over channels ch of
        // (ch + 1) * value, with ch = c * D + d.
        let depth = 3;
        let model = FnModel::new(
            info(&[None, Some(2 * depth), None, None]),
            info(&[None, Some(1), Some(1), None, None]),
            |data, shape| {
                let plane = shape[2] * shape[3];
                let item = shape[1] * plane;
                let mut out = vec![0.0; shape[0] * plane];
                for (b, x) in data.chunks(item).enumerate() {
                    for (ch, v) in x.chunks(plane).enumerate() {
                        for (o, &v) in out[b * plane..(b + 1) * plane].iter_mut().zip(v) {
                            *o += (ch + 1) as f32 * v;
                        }
                    }
                }
                (vec![shape[0], 1, 1, shape[2], shape[3]], out)
            },
        );
        let nz = 5;
        let image = z_image(2, 3, 4, nz);
        let slab = Slab {
            depth,
            batch_size: 4,
            ..Slab::default()
        };
        let out = slab.run(image.view(), &model, &|_, _| {}).unwrap();
        for z in 0..nz {
            let mut want = 0.0;
            for c in 0..2 {
                for d in 0..depth {
                    let zs = (z + d).saturating_sub(depth / 2).min(nz - 1);
                    want += ((c * depth + d) + 1) as f32 * (100 * c + zs) as f32;
                }
            }
            let got = out[[0, 2, 3, z]];
            assert!((got - want).abs() < 1e-3, "z {z}: {got} vs {want}");
        }
        // Batches mix slices: 5 slices in batches of 4.
        let calls = model.calls();
        assert_eq!(calls, vec![vec![4, 6, 3, 4], vec![1, 6, 3, 4]]);
    }

    #[test]
    fn rank5_model_with_rank5_output() {
        let model = FnModel::new(
            info(&[None, Some(1), Some(3), None, None]),
            info(&[None, Some(2), Some(1), None, None]),
            |data, shape| {
                // Two classes from the centre slice: x and -x.
                let plane = shape[3] * shape[4];
                let mut out = Vec::new();
                for x in data.chunks(shape[1] * shape[2] * plane) {
                    let centre = &x[plane..2 * plane];
                    out.extend_from_slice(centre);
                    out.extend(centre.iter().map(|v| -v));
                }
                (vec![shape[0], 2, 1, shape[3], shape[4]], out)
            },
        );
        let image = z_image(1, 5, 5, 4);
        let out = Slab::default()
            .run(image.view(), &model, &|_, _| {})
            .unwrap();
        assert_eq!(out.shape(), &[2, 5, 5, 4]);
        for ((k, _, _, z), &v) in out.indexed_iter() {
            let want = if k == 0 { z as f32 } else { -(z as f32) };
            assert!((v - want).abs() < 1e-5);
        }
    }

    /// 2D pointwise model on the centre slice: class c = (c + 1) * x + c.
    fn pointwise_2d<'a>(fixed_xy: Option<[usize; 2]>) -> FnModel<'a> {
        let xy = fixed_xy.map_or([None, None], |[x, y]| [Some(x), Some(y)]);
        FnModel::new(
            info(&[None, Some(1), Some(3), xy[0], xy[1]]),
            info(&[None, Some(2), xy[0], xy[1]]),
            |data, shape| {
                let plane = shape[3] * shape[4];
                let mut out = Vec::new();
                for x in data.chunks(shape[1] * shape[2] * plane) {
                    for c in 0..2 {
                        out.extend(
                            x[plane..2 * plane]
                                .iter()
                                .map(|&v| (c + 1) as f32 * v + c as f32),
                        );
                    }
                }
                (vec![shape[0], 2, shape[3], shape[4]], out)
            },
        )
    }

    #[test]
    fn in_plane_windows_match_whole_slices() {
        let image = Array::from_shape_fn((1, 40, 37, 6), |(_, x, y, z)| {
            ((x * 7 + y * 13 + z * 3) % 19) as f32 * 0.25 - 2.0
        });
        let whole = Slab::default()
            .run(image.view(), &pointwise_2d(None), &|_, _| {})
            .unwrap();
        for (roi_xy, mode) in [
            ([16, 16], BlendMode::Gaussian),
            ([16, 50], BlendMode::Gaussian),
            ([15, 12], BlendMode::Constant),
        ] {
            let model = pointwise_2d(None);
            let slab = Slab {
                roi_xy: Some(roi_xy),
                mode,
                overlap: 0.5,
                batch_size: 5,
                ..Slab::default()
            };
            let tiled = slab.run(image.view(), &model, &|_, _| {}).unwrap();
            for (a, b) in tiled.iter().zip(whole.iter()) {
                assert!((a - b).abs() < 1e-5, "{roi_xy:?}: {a} vs {b}");
            }
            assert!(model.calls().iter().all(|c| c[3..] == roi_xy));
        }
    }

    #[test]
    fn in_plane_blending_is_monai_2d() {
        // A slab of depth 1 with a 2D model is MONAI's 2D sliding window on
        // each slice; compare with the 3D runner on a [X, Y, 1] image with a
        // window of depth 1, which follows the same rules.
        let image = Array::from_shape_fn((1, 21, 17, 1), |(_, x, y, _)| {
            ((x * 5 + y * 3) % 11) as f32 - 5.0
        });
        let f = |c: usize, v: f32| v * (1.0 + c as f32);
        let model_2d = FnModel::new(
            info(&[None, Some(1), Some(1), None, None]),
            info(&[None, Some(2), None, None]),
            move |data, shape| {
                let plane = shape[3] * shape[4];
                let mut out = Vec::new();
                for x in data.chunks(plane) {
                    for c in 0..2 {
                        // Position-dependent, so window placement shows.
                        out.extend(x.iter().enumerate().map(|(i, &v)| f(c, v) + (i % 7) as f32));
                    }
                }
                (vec![shape[0], 2, shape[3], shape[4]], out)
            },
        );
        let model_3d = FnModel::new(
            info(&[None, Some(1), None, None, None]),
            info(&[None, Some(2), None, None, None]),
            move |data, shape| {
                let n: usize = shape[2..].iter().product();
                let mut out = Vec::new();
                for x in data.chunks(n) {
                    for c in 0..2 {
                        out.extend(x.iter().enumerate().map(|(i, &v)| f(c, v) + (i % 7) as f32));
                    }
                }
                (vec![shape[0], 2, shape[2], shape[3], shape[4]], out)
            },
        );
        let slab = Slab {
            depth: 1,
            roi_xy: Some([8, 20]),
            overlap: 0.25,
            ..Slab::default()
        };
        let sw = SlidingWindow {
            roi: [8, 20, 1],
            overlap: 0.25,
            ..SlidingWindow::default()
        };
        let a = slab.run(image.view(), &model_2d, &|_, _| {}).unwrap();
        let b = sw.run(image.view(), &model_3d, &|_, _| {}).unwrap();
        assert_eq!(a, b);
        // The 2D importance map is the 3D one with a unit axis.
        assert_eq!(
            importance_nd(&[8, 20], BlendMode::Gaussian, 0.125),
            crate::inference::blend::importance_nd(&[8, 20, 1], BlendMode::Gaussian, 0.125)
        );
    }

    #[test]
    fn fixed_model_plane_becomes_the_roi() {
        let model = pointwise_2d(Some([16, 16]));
        let image = z_image(1, 20, 30, 3);
        let out = Slab::default()
            .run(image.view(), &model, &|_, _| {})
            .unwrap();
        assert_eq!(out.shape(), &[2, 20, 30, 3]);
        assert!(model.calls().iter().all(|c| c[3..] == [16, 16]));
        for ((k, _, _, z), &v) in out.indexed_iter() {
            let want = (k + 1) as f32 * z as f32 + k as f32;
            assert!((v - want).abs() < 1e-4);
        }
        // A roi_xy that disagrees with the model is refused.
        let e = Slab {
            roi_xy: Some([8, 8]),
            ..Slab::default()
        }
        .run(image.view(), &model, &|_, _| {})
        .unwrap_err()
        .to_string();
        assert!(e.contains("[16, 16]") && e.contains("[8, 8]"), "{e}");
    }

    #[test]
    fn fixed_batch_slabs() {
        let model = FnModel::new(
            info(&[Some(4), Some(1), Some(3), None, None]),
            info(&[Some(4), Some(1), None, None]),
            |data, shape| {
                let plane = shape[3] * shape[4];
                let mut out = Vec::new();
                for x in data.chunks(3 * plane) {
                    out.extend_from_slice(&x[plane..2 * plane]);
                }
                (vec![shape[0], 1, shape[3], shape[4]], out)
            },
        );
        let image = z_image(1, 3, 3, 7);
        let out = Slab::default()
            .run(image.view(), &model, &|_, _| {})
            .unwrap();
        assert!(model.calls().iter().all(|c| c[0] == 4));
        assert_eq!(model.calls().len(), 2);
        for ((_, _, _, z), &v) in out.indexed_iter() {
            assert!((v - z as f32).abs() < 1e-5);
        }
    }

    #[test]
    fn wrong_slab_models_are_refused() {
        let image = z_image(1, 4, 4, 4);
        let copy = |data: &[f32], shape: &[usize]| (shape.to_vec(), data.to_vec());
        let run = |slab: &Slab, model: &FnModel| {
            slab.run(image.view(), model, &|_, _| {})
                .unwrap_err()
                .to_string()
        };
        let slab = Slab::default();

        let rank3 = FnModel::new(info(&[None; 3]), info(&[None; 4]), copy);
        assert!(run(&slab, &rank3).contains("rank 3"));

        let depth = FnModel::new(
            info(&[None, Some(1), Some(5), None, None]),
            info(&[None; 4]),
            copy,
        );
        let e = run(&slab, &depth);
        assert!(e.contains("slabs of 5 slices, depth is 3"), "{e}");

        let flat = FnModel::new(info(&[None, Some(4), None, None]), info(&[None; 4]), copy);
        let e = run(&slab, &flat);
        assert!(e.contains("4 input channels") && e.contains("= 3"), "{e}");

        let out_rank = FnModel::new(info(&[None; 5]), info(&[None; 3]), copy);
        assert!(run(&slab, &out_rank).contains("rank 3"));

        // Returns the whole slab instead of one slice.
        let whole = FnModel::new(info(&[None; 5]), info(&[None; 5]), copy);
        let e = run(&slab, &whole);
        assert!(e.contains("expected shape"), "{e}");

        let zero = Slab {
            depth: 0,
            ..Slab::default()
        };
        assert!(matches!(
            zero.run(image.view(), &whole, &|_, _| {}),
            Err(InferenceError::Settings(_))
        ));
    }

    #[test]
    fn settings_deserialize_with_defaults() {
        let s: Slab = serde_json::from_str(r#"{"depth": 5, "roi_xy": [224, 224]}"#).unwrap();
        assert_eq!(s.depth, 5);
        assert_eq!(s.roi_xy, Some([224, 224]));
        assert_eq!(s.mode, BlendMode::Gaussian);
        let s: Slab = serde_json::from_str("{}").unwrap();
        assert_eq!(s, Slab::default());
    }
}
