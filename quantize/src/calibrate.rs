//! Activation statistics and the clipping threshold each calibration method
//! picks from them.
//!
//! Quantization is symmetric (zero point 0, what TensorRT's explicit
//! quantization requires), so only |x| matters: each observed tensor keeps a
//! histogram of |x| over `[0, hi)`. When a larger value arrives, `hi` doubles
//! as often as needed and neighbouring bins merge pairwise, so the histogram
//! stays exact (no re-binning by interpolation) whatever order the windows
//! come in.

use serde::Serialize;

/// Histogram resolution; TensorRT's entropy calibrator uses the same 2048.
pub const BINS: usize = 2048;
/// Positive int8 levels of a symmetric quantizer (-127..=127).
pub const LEVELS: usize = 127;

/// How the clipping threshold (the value mapped to ±127) is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase", tag = "method", content = "value")]
pub enum Method {
    /// The largest |x| seen: nothing is clipped, outliers cost resolution.
    MinMax,
    /// This percentile of |x| (e.g. 99.99): the rarest outliers are clipped.
    Percentile(f64),
    /// The threshold whose quantized distribution is closest (KL
    /// divergence) to the observed one, as TensorRT's entropy calibrator.
    Entropy,
}

impl Method {
    pub fn describe(&self) -> String {
        match self {
            Method::MinMax => "minmax".into(),
            Method::Percentile(p) => format!("percentile {p}"),
            Method::Entropy => "entropy".into(),
        }
    }
}

/// |x| statistics of one tensor over all calibration windows.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    bins: Vec<u64>,
    /// Upper edge of the last bin; 0 until a non-zero value arrives.
    hi: f32,
    amax: f32,
    count: u64,
    non_finite: u64,
}

impl Histogram {
    pub fn new() -> Self {
        Histogram {
            bins: vec![0; BINS],
            ..Default::default()
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Values that were NaN or infinite (not counted in the histogram).
    pub fn non_finite(&self) -> u64 {
        self.non_finite
    }

    /// The largest finite |x| seen.
    pub fn amax(&self) -> f32 {
        self.amax
    }

    pub fn bin_width(&self) -> f32 {
        self.hi / BINS as f32
    }

    pub fn add(&mut self, values: &[f32]) {
        let mut batch_max = 0f32;
        for &v in values {
            if v.is_finite() {
                batch_max = batch_max.max(v.abs());
            }
        }
        if batch_max > self.hi {
            self.grow(batch_max);
        }
        self.amax = self.amax.max(batch_max);
        if self.hi == 0.0 {
            // All zeros so far: they all belong in bin 0.
            let finite = values.iter().filter(|v| v.is_finite()).count() as u64;
            self.bins[0] += finite;
            self.count += finite;
            self.non_finite += values.len() as u64 - finite;
            return;
        }
        let per_unit = BINS as f32 / self.hi;
        for &v in values {
            if !v.is_finite() {
                self.non_finite += 1;
                continue;
            }
            let i = ((v.abs() * per_unit) as usize).min(BINS - 1);
            self.bins[i] += 1;
            self.count += 1;
        }
    }

    /// Widens the range to hold `max`, doubling it so that old bins merge
    /// exactly into new ones.
    fn grow(&mut self, max: f32) {
        if self.hi == 0.0 {
            // A little head-room so the maximum itself is not on the edge.
            self.hi = max * (1.0 + 1.0 / BINS as f32);
            return;
        }
        let mut factor = 1usize;
        while self.hi * (factor as f32) < max {
            factor *= 2;
        }
        if factor >= BINS {
            // Every old value now falls in the first bin.
            let total: u64 = self.bins.iter().sum();
            self.bins.iter_mut().for_each(|b| *b = 0);
            self.bins[0] = total;
        } else {
            let mut merged = vec![0u64; BINS];
            for (i, &c) in self.bins.iter().enumerate() {
                merged[i / factor] += c;
            }
            self.bins = merged;
        }
        self.hi *= factor as f32;
    }

    /// The clipping threshold `method` picks; 0 when only zeros were seen.
    pub fn threshold(&self, method: Method) -> f32 {
        if self.count == 0 || self.amax == 0.0 {
            return 0.0;
        }
        match method {
            Method::MinMax => self.amax,
            Method::Percentile(p) => self.percentile(p),
            Method::Entropy => self.entropy_threshold(),
        }
    }

    fn percentile(&self, p: f64) -> f32 {
        let target = (p.clamp(0.0, 100.0) / 100.0) * self.count as f64;
        let width = self.bin_width() as f64;
        let mut below = 0f64;
        for (i, &c) in self.bins.iter().enumerate() {
            let c = c as f64;
            if below + c >= target && c > 0.0 {
                // Linear within the bin: values are assumed spread evenly.
                let frac = ((target - below) / c).clamp(0.0, 1.0);
                let t = (i as f64 + frac) * width;
                return (t as f32).min(self.amax);
            }
            below += c;
        }
        self.amax
    }

    /// TensorRT's KL-divergence calibration: for each candidate threshold
    /// (a bin edge from 128 bins up) the clipped distribution P (outliers
    /// folded into its last bin) is compared with Q, the same range squeezed
    /// into 128 levels and expanded back; the least divergent wins.
    fn entropy_threshold(&self) -> f32 {
        let last = match self.bins.iter().rposition(|&c| c > 0) {
            Some(i) => i + 1,
            None => return 0.0,
        };
        let levels = LEVELS + 1;
        if last <= levels {
            // Every occupied bin has its own level: nothing to gain by clipping.
            return self.amax;
        }
        let mut hist: Vec<f64> = self.bins[..last].iter().map(|&c| c as f64).collect();
        // The spike of exact and near zeros (after ReLUs, in attention
        // maps) would otherwise dominate the divergence and push the
        // threshold far into the signal; NVIDIA's calibrator flattens it
        // the same way.
        hist[0] = hist[1];
        let total: f64 = hist.iter().sum();
        let mut best = (f64::INFINITY, last);
        let mut outliers: f64 = 0.0;
        // Walk candidates from the top so outliers accumulate cheaply.
        for i in (levels..=last).rev() {
            if i < last {
                outliers += hist[i];
            }
            let mut p: Vec<f64> = hist[..i].to_vec();
            p[i - 1] += outliers;
            let q = expand_quantized(&hist[..i], levels);
            let kl = kl_divergence(&p, &q, total);
            if kl < best.0 {
                best = (kl, i);
            }
        }
        (best.1 as f32 * self.bin_width()).min(self.amax)
    }

    /// Expected squared quantization error per value for threshold `t`
    /// (rounding noise step²/12 inside the range, clipping error outside)
    /// over the signal power, in dB; `None` with no signal.
    pub fn sqnr_db(&self, t: f32) -> Option<f64> {
        if self.count == 0 || t <= 0.0 {
            return None;
        }
        let width = self.bin_width() as f64;
        let t = t as f64;
        let step = t / LEVELS as f64;
        let (mut signal, mut noise) = (0f64, 0f64);
        for (i, &c) in self.bins.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let c = c as f64;
            let centre = (i as f64 + 0.5) * width;
            signal += c * centre * centre;
            noise += if centre > t {
                c * (centre - t) * (centre - t)
            } else {
                c * step * step / 12.0
            };
        }
        (signal > 0.0).then(|| 10.0 * (signal / noise.max(f64::MIN_POSITIVE)).log10())
    }
}

/// Q of the entropy method: `hist` merged into `levels` groups, each
/// group's mass spread evenly over its non-empty bins.
fn expand_quantized(hist: &[f64], levels: usize) -> Vec<f64> {
    let n = hist.len();
    let mut q = vec![0f64; n];
    for l in 0..levels {
        let start = l * n / levels;
        let end = ((l + 1) * n / levels).max(start + 1).min(n);
        let mass: f64 = hist[start..end].iter().sum();
        let nonzero = hist[start..end].iter().filter(|&&c| c > 0.0).count();
        if nonzero == 0 {
            continue;
        }
        let share = mass / nonzero as f64;
        for j in start..end {
            if hist[j] > 0.0 {
                q[j] = share;
            }
        }
    }
    q
}

/// KL(P || Q), each normalised to unit mass; infinite where Q is empty but
/// P is not (a candidate whose last bin is empty cannot hold the folded
/// outliers, and is never chosen).
fn kl_divergence(p: &[f64], q: &[f64], total: f64) -> f64 {
    let q_total: f64 = q.iter().sum();
    if q_total == 0.0 || total == 0.0 {
        return f64::INFINITY;
    }
    let mut kl = 0.0;
    for (&pi, &qi) in p.iter().zip(q) {
        if pi == 0.0 {
            continue;
        }
        if qi == 0.0 {
            return f64::INFINITY;
        }
        let pn = pi / total;
        kl += pn * (pn / (qi / q_total)).ln();
    }
    kl
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic uniform values in [0, 1).
    fn uniform(n: usize, seed: u64) -> Vec<f32> {
        infl8_onnx::examples::pseudo_random(n, seed, 0.0, 1.0)
    }

    /// Standard normal values (Box-Muller).
    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        let u = uniform(2 * n, seed);
        u.chunks(2)
            .map(|p| {
                let r = (-2.0 * (p[0].max(1e-12) as f64).ln()).sqrt();
                (r * (2.0 * std::f64::consts::PI * p[1] as f64).cos()) as f32
            })
            .collect()
    }

    fn hist_of(chunks: &[&[f32]]) -> Histogram {
        let mut h = Histogram::new();
        for c in chunks {
            h.add(c);
        }
        h
    }

    #[test]
    fn minmax_is_the_largest_magnitude() {
        let mut v = uniform(10_000, 1);
        v.iter_mut().for_each(|x| *x = *x * 2.0 - 1.0);
        v[17] = -7.5;
        let h = hist_of(&[&v]);
        assert_eq!(h.threshold(Method::MinMax), 7.5);
    }

    #[test]
    fn percentile_clips_a_rare_outlier() {
        // 1e6 values in [-1, 1) and one at 50: the 99.99th percentile of
        // |x| is 0.9999, the outlier does not move it.
        let mut v = uniform(1_000_000, 2);
        v.iter_mut().for_each(|x| *x = *x * 2.0 - 1.0);
        v[5] = 50.0;
        let h = hist_of(&[&v[..1000], &v[1000..]]);
        let t = h.threshold(Method::Percentile(99.99));
        assert!((t - 0.9999).abs() < 0.03, "{t}");
        let t = h.threshold(Method::Percentile(50.0));
        assert!((t - 0.5).abs() < 0.03, "{t}");
        assert_eq!(h.threshold(Method::Percentile(100.0)), 50.0);
    }

    #[test]
    fn percentile_of_a_gaussian() {
        // P(|x| > 3.2905) = 1e-3 for a standard normal.
        let v = gaussian(1_000_000, 3);
        let h = hist_of(&[&v]);
        let t = h.threshold(Method::Percentile(99.9));
        assert!((t - 3.29).abs() < 0.05, "{t}");
    }

    #[test]
    fn entropy_keeps_a_uniform_whole_and_clips_a_gaussian_tail() {
        // Clipping a uniform distribution only adds error.
        let u = uniform(200_000, 4);
        let h = hist_of(&[&u]);
        let t = h.threshold(Method::Entropy);
        assert!(t > 0.9 && t <= 1.0, "uniform: {t}");

        // A Gaussian's sparse tail is cheaper to clip than to resolve:
        // entropy lands well inside the range, yet beyond 2 sigma.
        let g = gaussian(1_000_000, 5);
        let h = hist_of(&[&g]);
        let (t, max) = (h.threshold(Method::Entropy), h.threshold(Method::MinMax));
        assert!(max > 4.5, "{max}");
        assert!(t > 2.0 && t < 0.9 * max, "gaussian: entropy {t}, max {max}");
    }

    #[test]
    fn growing_the_range_merges_bins_exactly() {
        // Same values in two orders: the small ones first (the range then
        // doubles several times) or the large one first.
        let mut small = uniform(50_000, 6);
        small.iter_mut().for_each(|x| *x *= 0.01);
        let big = [3.0f32];
        let a = hist_of(&[&small, &big]);
        let b = hist_of(&[&big, &small]);
        assert_eq!(a.count(), b.count());
        assert_eq!(a.amax(), b.amax());
        // Both put the small values in the low bins only.
        let low = |h: &Histogram| {
            let edge = (0.01 / h.bin_width()).ceil() as usize + 1;
            h.bins[..edge].iter().sum::<u64>()
        };
        assert_eq!(low(&a), 50_000);
        assert_eq!(low(&b), 50_000);
    }

    #[test]
    fn non_finite_values_are_counted_apart() {
        let h = hist_of(&[&[1.0, f32::NAN, -2.0, f32::INFINITY]]);
        assert_eq!(h.count(), 2);
        assert_eq!(h.non_finite(), 2);
        assert_eq!(h.amax(), 2.0);
    }

    #[test]
    fn all_zero_tensor_has_no_threshold() {
        let h = hist_of(&[&[0.0; 100]]);
        assert_eq!(h.threshold(Method::MinMax), 0.0);
        assert_eq!(h.threshold(Method::Entropy), 0.0);
        assert_eq!(h.sqnr_db(0.0), None);
    }

    #[test]
    fn sqnr_of_a_uniform_is_about_6db_per_bit() {
        // Uniform on [0,1) with step 1/127: signal 1/3, noise step²/12
        // -> 10 log10(4 * 127²) = 48.1 dB.
        let h = hist_of(&[&uniform(100_000, 7)]);
        let s = h.sqnr_db(1.0).unwrap();
        assert!((s - 48.1).abs() < 0.5, "{s}");
        // Clipping at half the range costs far more than rounding.
        assert!(h.sqnr_db(0.5).unwrap() < 15.0);
    }
}
