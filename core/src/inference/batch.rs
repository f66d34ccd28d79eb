//! Running windows through a model in batches: the batch plan and the
//! loop that fills, runs and hands back each batch.

use rayon::prelude::*;

use super::InferenceError;
use crate::backend::{Dim, Model, Tensor, TensorInfo};

/// How many windows go into one model call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BatchPlan {
    pub size: usize,
    /// The model's batch dimension is fixed: every call carries exactly
    /// `size` windows.
    pub fixed: bool,
}

impl BatchPlan {
    pub(crate) fn new(
        input: &TensorInfo,
        requested: usize,
        total: usize,
    ) -> Result<Self, InferenceError> {
        match input.shape.first().and_then(Dim::fixed) {
            Some(0) => Err(InferenceError::ModelInput {
                model: input.to_string(),
                reason: "its batch dimension is fixed at 0".into(),
            }),
            Some(b) => Ok(BatchPlan {
                size: b,
                fixed: true,
            }),
            // No point allocating room for more windows than there are.
            None => Ok(BatchPlan {
                size: requested.min(total).max(1),
                fixed: false,
            }),
        }
    }
}

/// Drives the model over `total` items: `fill(i, dst)` writes item `i`
/// (`item_shape`, C order) into its slot of one reused batch buffer;
/// `consume(first, n, sent, output)` receives each batch's output, of which
/// the first `n` items are real (the rest zero padding for fixed-batch
/// models) and `sent` is the batch size the model was given.
pub(crate) fn run_batches<F, C>(
    model: &dyn Model,
    plan: BatchPlan,
    item_shape: &[usize],
    total: usize,
    fill: F,
    mut consume: C,
    progress: &dyn Fn(u64, u64),
) -> Result<(), InferenceError>
where
    F: Fn(usize, &mut [f32]) + Sync,
    C: FnMut(usize, usize, usize, &Tensor) -> Result<(), InferenceError>,
{
    let item_len: usize = item_shape.iter().product();
    if item_len == 0 {
        return Err(InferenceError::Shape(format!(
            "empty model input item {item_shape:?}"
        )));
    }
    let mut shape = Vec::with_capacity(item_shape.len() + 1);
    shape.push(0);
    shape.extend_from_slice(item_shape);
    let mut buf: Vec<f32> = Vec::new();
    let mut first = 0;
    while first < total {
        let n = plan.size.min(total - first);
        let sent = if plan.fixed { plan.size } else { n };
        buf.resize(sent * item_len, 0.0);
        let (items, padding) = buf.split_at_mut(n * item_len);
        items
            .par_chunks_mut(item_len)
            .enumerate()
            .for_each(|(i, dst)| fill(first + i, dst));
        padding.fill(0.0);
        shape[0] = sent;
        let out = model.run(&buf, &shape)?;
        consume(first, n, sent, &out)?;
        first += n;
        progress(first as u64, total as u64);
    }
    Ok(())
}
