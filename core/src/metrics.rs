//! Agreement between label maps.

/// Hard Dice of one label value between two label maps; `None` when the
/// label is absent from both (undefined, left out of means).
pub fn hard_dice(pred: &[u8], truth: &[u8], label: u8) -> Option<f64> {
    let (mut inter, mut a, mut b) = (0u64, 0u64, 0u64);
    for (&p, &t) in pred.iter().zip(truth) {
        let (pp, tt) = (p == label, t == label);
        inter += u64::from(pp && tt);
        a += u64::from(pp);
        b += u64::from(tt);
    }
    (a + b > 0).then(|| 2.0 * inter as f64 / (a + b) as f64)
}

/// Signal-to-quantization-noise ratio of `approx` against `reference`,
/// in dB; `None` when the reference is all zeros.
pub fn sqnr_db(reference: &[f32], approx: &[f32]) -> Option<f64> {
    let (mut signal, mut noise) = (0f64, 0f64);
    for (&r, &a) in reference.iter().zip(approx) {
        signal += (r as f64).powi(2);
        noise += ((r - a) as f64).powi(2);
    }
    (signal > 0.0).then(|| 10.0 * (signal / noise.max(f64::MIN_POSITIVE)).log10())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_dice_cases() {
        assert_eq!(hard_dice(&[1, 1, 0, 0], &[1, 0, 1, 0], 1), Some(0.5));
        assert_eq!(hard_dice(&[0, 0], &[0, 0], 1), None);
        assert_eq!(hard_dice(&[2, 2], &[2, 2], 2), Some(1.0));
    }

    #[test]
    fn sqnr_by_hand() {
        // Signal 1 + 1 = 2, noise 0.01 + 0.01 = 0.02: ratio 100, 20 dB.
        let s = sqnr_db(&[1.0, -1.0], &[1.1, -0.9]).unwrap();
        assert!((s - 20.0).abs() < 1e-4, "{s}");
        assert_eq!(sqnr_db(&[0.0], &[1.0]), None);
    }
}
