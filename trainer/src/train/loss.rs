//! Dice + cross-entropy, the standard segmentation loss (nnU-Net, UNETR).
//!
//! Both terms take logits `[B, K, ...]` and a one-hot target of the same
//! shape. The Dice term is the soft Dice over the batch and all voxels
//! (batch Dice, as nnU-Net), averaged over the foreground classes: the
//! background is left to cross-entropy, as it dominates brain-mask volumes
//! and would make Dice trivially high.

use burn::tensor::Tensor;
use burn::tensor::activation::{log_softmax, softmax};

/// Smoothing of the soft Dice, so an absent class with no prediction gives
/// a Dice of 1 rather than 0/0.
pub const DICE_SMOOTH: f64 = 1e-5;

/// Mean voxel-wise cross-entropy.
pub fn cross_entropy<const D: usize>(logits: Tensor<D>, target: Tensor<D>) -> Tensor<1> {
    let dims = logits.dims();
    let voxels: usize = dims
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, d)| d)
        .product();
    (log_softmax(logits, 1) * target).sum().neg() / voxels as f64
}

/// `1 - mean over foreground classes of the batch soft Dice`.
pub fn dice_loss<const D: usize>(logits: Tensor<D>, target: Tensor<D>) -> Tensor<1> {
    let k = logits.dims()[1];
    let p = softmax(logits, 1);
    // Sum everything but the class axis: [K].
    let inter = per_class_sum(p.clone() * target.clone());
    let denom = per_class_sum(p) + per_class_sum(target);
    let dice = (inter * 2.0 + DICE_SMOOTH) / (denom + DICE_SMOOTH);
    let fg = dice.narrow(0, 1, k - 1);
    fg.mean().neg() + 1.0
}

fn per_class_sum<const D: usize>(t: Tensor<D>) -> Tensor<1> {
    let k = t.dims()[1];
    t.swap_dims(0, 1)
        .reshape([k as i64, -1])
        .sum_dim(1)
        .reshape([k])
}

/// The training loss: cross-entropy + Dice, equally weighted.
pub fn dice_ce<const D: usize>(logits: Tensor<D>, target: Tensor<D>) -> (Tensor<1>, f32, f32) {
    let ce = cross_entropy(logits.clone(), target.clone());
    let dl = dice_loss(logits, target);
    let (c, d) = (scalar(&ce), scalar(&dl));
    (ce + dl, c, d)
}

/// The value of a one-element tensor (NaN if it cannot be read).
pub fn scalar(t: &Tensor<1>) -> f32 {
    t.to_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .ok()
        .and_then(|v| v.first().copied())
        .unwrap_or(f32::NAN)
}

pub use infl8_core::metrics::hard_dice;

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn t(data: Vec<f32>, shape: [usize; 3]) -> Tensor<3> {
        Tensor::from_data(TensorData::new(data, shape), &Device::default())
    }

    /// Two classes, batch 1, three voxels: logits (0, ln 3), (0, 0),
    /// (ln 3, 0); targets 1, 1, 0.
    fn case() -> (Tensor<3>, Tensor<3>) {
        let l3 = 3f32.ln();
        let logits = t(vec![0.0, 0.0, l3, l3, 0.0, 0.0], [1, 2, 3]);
        let target = t(vec![0.0, 0.0, 1.0, 1.0, 1.0, 0.0], [1, 2, 3]);
        (logits, target)
    }

    #[test]
    fn cross_entropy_by_hand() {
        // p(target) = 3/4, 1/2, 3/4 -> mean of -ln.
        let want = -((0.75f64).ln() * 2.0 + (0.5f64).ln()) / 3.0;
        let (l, tg) = case();
        let got = scalar(&cross_entropy(l, tg));
        assert!((f64::from(got) - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn dice_by_hand() {
        // Foreground p = 3/4, 1/2, 1/4; target 1, 1, 0.
        // inter = 1.25, sum p = 1.5, sum t = 2 -> dice = 2.5 / 3.5.
        let want = 1.0 - (2.5 + DICE_SMOOTH) / (3.5 + DICE_SMOOTH);
        let (l, tg) = case();
        let got = scalar(&dice_loss(l, tg));
        assert!((f64::from(got) - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn perfect_prediction_has_low_loss() {
        let logits = t(vec![-20.0, 20.0, 20.0, -20.0], [1, 2, 2]);
        let target = t(vec![0.0, 1.0, 1.0, 0.0], [1, 2, 2]);
        let (total, ce, dice) = dice_ce(logits, target);
        assert!(ce < 1e-6 && dice < 1e-6 && scalar(&total) < 1e-5);
    }
}
