//! Intensity normalisation of one channel (window, z-score, percentiles).
//! It has no inverse: outputs are labels or logits, never intensities.

use rayon::prelude::*;

use super::Normalization;

const CHUNK: usize = 1 << 16;

/// Normalise one channel in place. The spec has been validated.
pub fn normalize(values: &mut [f32], norm: &Normalization) {
    match *norm {
        Normalization::None => {}
        Normalization::IntensityWindow { lo, hi } => intensity_window(values, lo, hi),
        Normalization::Zscore { nonzero } => zscore(values, nonzero),
        Normalization::HeadZscore => head_zscore(values),
        Normalization::Percentile { lo, hi } => {
            let (plo, phi) = percentiles(values, lo, hi);
            if phi > plo {
                intensity_window(values, plo, phi);
            } else {
                // A constant channel: every value sits at the window's floor.
                tracing::warn!(
                    lo,
                    hi,
                    value = plo,
                    "percentile window is empty (constant channel); output is 0"
                );
                values.par_iter_mut().for_each(|v| *v = 0.0);
            }
        }
    }
}

fn intensity_window(values: &mut [f32], lo: f64, hi: f64) {
    let scale = 1.0 / (hi - lo);
    values.par_chunks_mut(CHUNK).for_each(|c| {
        for v in c {
            *v = ((f64::from(*v).clamp(lo, hi) - lo) * scale) as f32;
        }
    });
}

fn zscore(values: &mut [f32], nonzero: bool) {
    let keep = |v: f32| !nonzero || v != 0.0;
    if let Some((mean, std)) = mean_std(values, keep) {
        apply_zscore(values, mean, std, keep);
    }
}

fn head_zscore(values: &mut [f32]) {
    let Some(threshold) = otsu_threshold(values) else {
        return;
    };
    let head = |v: f32| f64::from(v) > threshold;
    if let Some((mean, std)) = mean_std(values, head) {
        apply_zscore(values, mean, std, |_| true);
    }
}

/// Otsu's threshold of the values on a 256-bin histogram between their
/// minimum and maximum: the cut that best separates the dark (air) from
/// the bright (head) class. `None` for an empty or constant channel.
pub(super) fn otsu_threshold(values: &[f32]) -> Option<f64> {
    const BINS: usize = 256;
    let (lo, hi) = values
        .par_chunks(CHUNK)
        .map(|c| {
            c.iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                    (a.min(f64::from(*v)), b.max(f64::from(*v)))
                })
        })
        .reduce(
            || (f64::INFINITY, f64::NEG_INFINITY),
            |a, b| (a.0.min(b.0), a.1.max(b.1)),
        );
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return None;
    }
    let width = (hi - lo) / BINS as f64;
    let bin = |v: f32| (((f64::from(v) - lo) / width) as usize).min(BINS - 1);
    let hist = values
        .par_chunks(CHUNK)
        .map(|c| {
            let mut h = [0u64; BINS];
            for v in c {
                h[bin(*v)] += 1;
            }
            h
        })
        .reduce(
            || [0u64; BINS],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        );
    let total = values.len() as f64;
    let sum_all: f64 = hist
        .iter()
        .enumerate()
        .map(|(i, n)| i as f64 * *n as f64)
        .sum();
    let (mut below, mut sum_below) = (0.0, 0.0);
    let (mut best, mut best_cut) = (-1.0, 0);
    for (i, n) in hist.iter().enumerate().take(BINS - 1) {
        below += *n as f64;
        sum_below += i as f64 * *n as f64;
        let above = total - below;
        if below == 0.0 || above == 0.0 {
            continue;
        }
        let gap = sum_below / below - (sum_all - sum_below) / above;
        let between = below * above * gap * gap;
        if between > best {
            (best, best_cut) = (between, i);
        }
    }
    Some(lo + (best_cut + 1) as f64 * width)
}

/// Mean and population std of the values `keep` selects, in f64 over two
/// passes (mean, then squared deviations): one pass with a sum of squares
/// loses everything on CT-sized offsets.
fn mean_std(values: &[f32], keep: impl Fn(f32) -> bool + Sync) -> Option<(f64, f64)> {
    let (sum, count) = values
        .par_chunks(CHUNK)
        .map(|c| {
            c.iter()
                .filter(|v| keep(**v))
                .fold((0.0f64, 0u64), |(s, n), v| (s + f64::from(*v), n + 1))
        })
        .reduce(|| (0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    if count == 0 {
        return None;
    }
    let mean = sum / count as f64;
    let ss: f64 = values
        .par_chunks(CHUNK)
        .map(|c| {
            c.iter()
                .filter(|v| keep(**v))
                .map(|v| (f64::from(*v) - mean).powi(2))
                .sum::<f64>()
        })
        .sum();
    Some((mean, (ss / count as f64).sqrt()))
}

/// A zero std only subtracts the mean.
fn apply_zscore(values: &mut [f32], mean: f64, std: f64, keep: impl Fn(f32) -> bool + Sync) {
    let inv = if std > 0.0 { 1.0 / std } else { 1.0 };
    values.par_chunks_mut(CHUNK).for_each(|c| {
        for v in c.iter_mut().filter(|v| keep(**v)) {
            *v = ((f64::from(*v) - mean) * inv) as f32;
        }
    });
}

/// The `lo` and `hi` percentiles (linear interpolation between order
/// statistics, numpy's default). Uses one scratch copy and two O(n)
/// selections instead of a sort.
pub(super) fn percentiles(values: &[f32], lo: f64, hi: f64) -> (f64, f64) {
    let mut scratch = values.to_vec();
    let n = scratch.len();
    let rank = |p: f64| p / 100.0 * (n - 1) as f64;
    let (rlo, rhi) = (rank(lo), rank(hi));
    let klo = (rlo.floor() as usize).min(n - 1);
    let khi = (rhi.floor() as usize).min(n - 1).max(klo);
    let (_, vlo, upper) = scratch.select_nth_unstable_by(klo, f32::total_cmp);
    let vlo = *vlo;
    // Everything above klo is now in `upper`, unordered.
    let next_lo = upper.iter().copied().min_by(f32::total_cmp).unwrap_or(vlo);
    let (vhi, next_hi) = if khi == klo {
        (vlo, next_lo)
    } else {
        let (_, vhi, upper) = upper.select_nth_unstable_by(khi - klo - 1, f32::total_cmp);
        let vhi = *vhi;
        (
            vhi,
            upper.iter().copied().min_by(f32::total_cmp).unwrap_or(vhi),
        )
    };
    let interp = |v: f32, next: f32, r: f64, k: usize| {
        f64::from(v) + (f64::from(next) - f64::from(v)) * (r - k as f64)
    };
    (
        interp(vlo, next_lo, rlo, klo),
        interp(vhi, next_hi, rhi, khi),
    )
}
