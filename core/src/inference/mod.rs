//! Window-based inference: MONAI-equivalent sliding window, 2.5D slabs, post-processing.
//!
//! Both window schemes cut the image into model-sized pieces, run them in
//! batches through a [`Model`](crate::backend::Model) and blend the
//! predictions back into one `[K, X, Y, Z]` array of per-class scores;
//! [`postprocess`] turns those scores into labels. What the two schemes
//! share lives beside them: window placement (`grid.rs`), blending
//! (`blend.rs`), batching (`batch.rs`) and the model checks (`check.rs`).

pub(crate) mod batch;
pub(crate) mod blend;
pub(crate) mod check;
pub(crate) mod grid;
pub mod postprocess;
pub mod slab;
pub mod sliding_window;

pub use postprocess::{
    argmax, fill_holes_per_label, keep_largest_component_per_label, largest_component,
    softmax_inplace,
};
pub use slab::Slab;
pub use sliding_window::{
    Accumulator, BlendMode, SlidingWindow, importance_map, scan_interval, window_starts,
};

use crate::backend::BackendError;

/// Why window-based inference or post-processing failed.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("invalid inference settings: {0}")]
    Settings(String),
    #[error("invalid image: {0}")]
    Image(String),
    #[error("model input {model} does not fit: {reason}")]
    ModelInput { model: String, reason: String },
    #[error("model output {model} is unusable: {reason}")]
    ModelOutput { model: String, reason: String },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error(
        "cannot label {0} classes: labels are stored as u8, so between 1 and 256 classes are supported"
    )]
    ClassCount(usize),
    #[error(
        "logits contain NaN (first at class {class}, voxel {voxel:?}): the model produced invalid scores"
    )]
    NanLogit { class: usize, voxel: [usize; 3] },
}

#[cfg(test)]
pub(crate) mod test_util {
    //! In-process models for the unit tests of this module.

    use std::sync::Mutex;

    use crate::backend::{BackendError, Dim, Model, Tensor, TensorInfo};

    /// A tensor description; `None` is a symbolic dimension.
    pub(crate) fn info(dims: &[Option<usize>]) -> TensorInfo {
        TensorInfo {
            name: "t".into(),
            shape: dims
                .iter()
                .enumerate()
                .map(|(i, d)| match d {
                    Some(n) => Dim::Fixed(*n),
                    None => Dim::Symbolic(format!("d{i}")),
                })
                .collect(),
        }
    }

    type RunFn<'a> = Box<dyn Fn(&[f32], &[usize]) -> (Vec<usize>, Vec<f32>) + Send + Sync + 'a>;

    /// A model whose batch function is a closure returning (shape, data);
    /// it records the shape of every batch it was given.
    pub(crate) struct FnModel<'a> {
        input: TensorInfo,
        output: TensorInfo,
        f: Option<RunFn<'a>>,
        calls: Mutex<Vec<Vec<usize>>>,
    }

    impl<'a> FnModel<'a> {
        pub(crate) fn new(
            input: TensorInfo,
            output: TensorInfo,
            f: impl Fn(&[f32], &[usize]) -> (Vec<usize>, Vec<f32>) + Send + Sync + 'a,
        ) -> Self {
            FnModel {
                input,
                output,
                f: Some(Box::new(f)),
                calls: Mutex::new(Vec::new()),
            }
        }

        /// A 3D model `[B, cin, x, y, z] -> [B, cout, x, y, z]` computing
        /// output channel c at each voxel as `f(c, input channel 0)`.
        pub(crate) fn pointwise(
            cin: usize,
            cout: usize,
            f: impl Fn(usize, f32) -> f32 + Send + Sync + 'a,
        ) -> Self {
            FnModel::new(
                info(&[None, Some(cin), None, None, None]),
                info(&[None, Some(cout), None, None, None]),
                move |data, shape| {
                    let n: usize = shape[2..].iter().product();
                    let mut out = Vec::with_capacity(shape[0] * cout * n);
                    for item in data.chunks(cin * n) {
                        for c in 0..cout {
                            out.extend(item[..n].iter().map(|&x| f(c, x)));
                        }
                    }
                    let mut s = shape.to_vec();
                    s[1] = cout;
                    (s, out)
                },
            )
        }

        /// A model whose every run fails.
        pub(crate) fn failing() -> Self {
            FnModel {
                input: info(&[None; 5]),
                output: info(&[None; 5]),
                f: None,
                calls: Mutex::new(Vec::new()),
            }
        }

        pub(crate) fn calls(&self) -> Vec<Vec<usize>> {
            self.calls.lock().map(|c| c.clone()).unwrap_or_default()
        }
    }

    impl Model for FnModel<'_> {
        fn input(&self) -> &TensorInfo {
            &self.input
        }

        fn output(&self) -> &TensorInfo {
            &self.output
        }

        fn run(&self, data: &[f32], shape: &[usize]) -> Result<Tensor, BackendError> {
            if let Ok(mut calls) = self.calls.lock() {
                calls.push(shape.to_vec());
            }
            assert_eq!(data.len(), shape.iter().product::<usize>());
            let f = self
                .f
                .as_ref()
                .ok_or_else(|| BackendError::Run("this model always fails".into()))?;
            let (shape, data) = f(data, shape);
            Tensor::from_vec(shape, data)
        }
    }
}
