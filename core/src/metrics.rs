//! Agreement between label maps: overlap (Dice), boundary distance (HD95)
//! and size (volume error).

use ndarray::{Array3, ArrayView3, Axis, Zip};

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

/// Signed relative volume error `(|pred| - |truth|) / |truth|` of two
/// masks (positive: the prediction is too large); `None` when `truth` is
/// empty.
pub fn volume_error(pred: ArrayView3<bool>, truth: ArrayView3<bool>) -> Option<f64> {
    let count = |m: ArrayView3<bool>| m.iter().filter(|&&v| v).count() as f64;
    let t = count(truth);
    (t > 0.0).then(|| (count(pred) - t) / t)
}

/// Surface voxels of a mask: mask voxels with at least one of their six
/// face neighbours outside the mask. The grid's border counts as outside,
/// so a mask cut by the field of view has a surface on the cut too (as in
/// MedPy and MONAI, which erode with a zero border).
pub fn surface(mask: ArrayView3<bool>) -> Array3<bool> {
    let (nx, ny, nz) = mask.dim();
    let at = |i: isize, j: isize, k: isize| {
        i >= 0
            && j >= 0
            && k >= 0
            && (i as usize) < nx
            && (j as usize) < ny
            && (k as usize) < nz
            && mask[[i as usize, j as usize, k as usize]]
    };
    Array3::from_shape_fn((nx, ny, nz), |(i, j, k)| {
        let (i, j, k) = (i as isize, j as isize, k as isize);
        at(i, j, k)
            && !(at(i - 1, j, k)
                && at(i + 1, j, k)
                && at(i, j - 1, k)
                && at(i, j + 1, k)
                && at(i, j, k - 1)
                && at(i, j, k + 1))
    })
}

/// Exact squared Euclidean distance (mm^2) from every voxel to the nearest
/// `true` voxel of `features`, with voxel size `spacing` (mm) along each
/// axis; `f64::INFINITY` everywhere when there is no feature voxel.
///
/// Felzenszwalb & Huttenlocher's separable transform (Theory of Computing
/// 8, 2012): one lower envelope of parabolas per grid line and axis, so
/// O(N) in the voxel count, where pairwise surface distances would be
/// O(N^2) and take minutes on a 1 mm head.
pub fn squared_edt(features: ArrayView3<bool>, spacing: [f64; 3]) -> Array3<f64> {
    let mut d = features.mapv(|f| if f { 0.0 } else { f64::INFINITY });
    let n = d.shape().iter().copied().max().unwrap_or(0);
    let mut env = Envelope::with_capacity(n);
    for (axis, &s) in spacing.iter().enumerate() {
        for mut lane in d.lanes_mut(Axis(axis)) {
            env.f.clear();
            env.f.extend(lane.iter().copied());
            env.transform(s);
            for (dst, &v) in lane.iter_mut().zip(&env.out) {
                *dst = v;
            }
        }
    }
    d
}

/// Working buffers of the 1D transform, reused across grid lines.
struct Envelope {
    f: Vec<f64>,
    out: Vec<f64>,
    /// Sample indices of the parabolas in the lower envelope.
    v: Vec<usize>,
    /// Boundaries between consecutive envelope parabolas (mm).
    z: Vec<f64>,
}

impl Envelope {
    fn with_capacity(n: usize) -> Self {
        Envelope {
            f: Vec::with_capacity(n),
            out: Vec::with_capacity(n),
            v: Vec::with_capacity(n),
            z: Vec::with_capacity(n + 1),
        }
    }

    /// `out[q] = min_p (s (q - p))^2 + f[p]` over the samples `p` where
    /// `f` is finite; infinite everywhere when none is.
    fn transform(&mut self, s: f64) {
        let f = &self.f;
        self.out.clear();
        self.v.clear();
        self.z.clear();
        let x = |q: usize| q as f64 * s;
        for q in (0..f.len()).filter(|&q| f[q].is_finite()) {
            let mut cut = f64::NEG_INFINITY;
            while let Some(&p) = self.v.last() {
                cut = ((f[q] + x(q) * x(q)) - (f[p] + x(p) * x(p))) / (2.0 * (x(q) - x(p)));
                if cut <= *self.z.last().unwrap_or(&f64::NEG_INFINITY) {
                    self.v.pop();
                    self.z.pop();
                    cut = f64::NEG_INFINITY;
                } else {
                    break;
                }
            }
            self.v.push(q);
            self.z.push(cut);
        }
        if self.v.is_empty() {
            self.out.resize(f.len(), f64::INFINITY);
            return;
        }
        let mut k = 0;
        for q in 0..f.len() {
            while k + 1 < self.v.len() && self.z[k + 1] < x(q) {
                k += 1;
            }
            let p = self.v[k];
            self.out.push((x(q) - x(p)).powi(2) + f[p]);
        }
    }
}

/// Distances (mm) from every surface voxel of `from` to the nearest
/// surface voxel of `to`; empty when `from` is empty, infinite when only
/// `to` is.
pub fn surface_distances(
    from: ArrayView3<bool>,
    to: ArrayView3<bool>,
    spacing: [f64; 3],
) -> Vec<f64> {
    let dt = squared_edt(surface(to).view(), spacing);
    let mut out = Vec::new();
    Zip::from(&surface(from)).and(&dt).for_each(|&s, &d| {
        if s {
            out.push(d.sqrt());
        }
    });
    out
}

/// The `p`-th percentile (0..=100) with linear interpolation between
/// closest ranks (NumPy's default); `None` for no values.
pub fn percentile(values: &mut [f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let pos = p.clamp(0.0, 100.0) / 100.0 * (values.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let (a, b) = (values[lo], values[hi]);
    Some(if lo == hi {
        a
    } else {
        a + (b - a) * (pos - lo as f64)
    })
}

/// 95th-percentile symmetric Hausdorff distance (mm) between two masks on
/// one grid with voxel size `spacing`: the larger of the two directed
/// 95th percentiles of surface-to-surface distances (the definition of
/// MONAI's `compute_hausdorff_distance(percentile=95)`). `None` when
/// either mask is empty (undefined). Spacing is the affine's column
/// norms: exact for any rotation, approximate only for sheared grids.
pub fn hausdorff95_mm(
    pred: ArrayView3<bool>,
    truth: ArrayView3<bool>,
    spacing: [f64; 3],
) -> Option<f64> {
    if !pred.iter().any(|&v| v) || !truth.iter().any(|&v| v) {
        return None;
    }
    let a = percentile(&mut surface_distances(pred, truth, spacing), 95.0)?;
    let b = percentile(&mut surface_distances(truth, pred, spacing), 95.0)?;
    Some(a.max(b))
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

    fn cube(dims: [usize; 3], lo: [usize; 3], hi: [usize; 3]) -> Array3<bool> {
        Array3::from_shape_fn(dims, |(i, j, k)| {
            (lo[0]..hi[0]).contains(&i)
                && (lo[1]..hi[1]).contains(&j)
                && (lo[2]..hi[2]).contains(&k)
        })
    }

    fn ball(dims: [usize; 3], centre: [f64; 3], r_mm: f64, sp: [f64; 3]) -> Array3<bool> {
        Array3::from_shape_fn(dims, |(i, j, k)| {
            let d2: f64 = [i, j, k]
                .iter()
                .zip(centre.iter().zip(sp))
                .map(|(&v, (&c, s))| ((v as f64 - c) * s).powi(2))
                .sum();
            d2 <= r_mm * r_mm
        })
    }

    fn random_mask(dims: [usize; 3], density: u64, seed: u64) -> Array3<bool> {
        let mut s = seed;
        Array3::from_shape_fn(dims, |_| crate::rng::splitmix64(&mut s) % 100 < density)
    }

    #[test]
    fn edt_matches_brute_force_with_anisotropic_spacing() {
        let sp = [0.7, 1.3, 2.9];
        for (seed, density) in [(1, 2), (2, 10), (3, 40)] {
            let m = random_mask([9, 7, 11], density, seed);
            let pts: Vec<[usize; 3]> = m
                .indexed_iter()
                .filter(|(_, v)| **v)
                .map(|((i, j, k), _)| [i, j, k])
                .collect();
            let dt = squared_edt(m.view(), sp);
            for ((i, j, k), &d) in dt.indexed_iter() {
                let want = pts
                    .iter()
                    .map(|p| {
                        (0..3)
                            .map(|a| (([i, j, k][a] as f64 - p[a] as f64) * sp[a]).powi(2))
                            .sum::<f64>()
                    })
                    .fold(f64::INFINITY, f64::min);
                assert!(
                    (d - want).abs() < 1e-9,
                    "seed {seed} at {i},{j},{k}: {d} vs {want}"
                );
            }
        }
        let empty = squared_edt(Array3::from_elem([3, 3, 3], false).view(), sp);
        assert!(empty.iter().all(|v| v.is_infinite()));
    }

    #[test]
    fn surface_is_the_six_connected_border() {
        let c = cube([7, 7, 7], [1, 1, 1], [6, 6, 6]);
        let s = surface(c.view());
        // A 5^3 cube has 5^3 - 3^3 border voxels; the grid edge is outside.
        assert_eq!(s.iter().filter(|&&v| v).count(), 125 - 27);
        assert!(!s[[3, 3, 3]] && s[[1, 3, 3]]);
        let full = Array3::from_elem([3, 3, 3], true);
        assert_eq!(surface(full.view()).iter().filter(|&&v| v).count(), 26);
    }

    #[test]
    fn inset_cube_is_two_mm_from_its_outer_cube_on_every_face() {
        // 4 x 0.5 mm, 2 x 1 mm and 1 x 2 mm inset: 2 mm on every face.
        let sp = [0.5, 1.0, 2.0];
        let outer = cube([40, 24, 16], [4, 4, 3], [36, 20, 13]);
        let inner = cube([40, 24, 16], [8, 6, 4], [32, 18, 12]);
        let d = surface_distances(inner.view(), outer.view(), sp);
        assert!(d.iter().all(|&v| (v - 2.0).abs() < 1e-12), "{d:?}");
    }

    #[test]
    fn shifted_cubes_have_the_shift_as_hausdorff_distance() {
        // Shifted by 3 voxels of 1.5 mm along x: no surface point of one is
        // more than 4.5 mm from the other's, the shifted faces exactly so.
        let sp = [1.5, 1.0, 1.0];
        let a = cube([30, 20, 20], [5, 5, 5], [15, 15, 15]);
        let b = cube([30, 20, 20], [8, 5, 5], [18, 15, 15]);
        for (x, y) in [(&a, &b), (&b, &a)] {
            let mut d = surface_distances(x.view(), y.view(), sp);
            assert_eq!(percentile(&mut d, 100.0), Some(4.5));
        }
        let hd = hausdorff95_mm(a.view(), b.view(), sp).unwrap();
        assert!(hd > 0.0 && hd <= 4.5, "{hd}");
    }

    #[test]
    fn concentric_spheres_are_their_radius_difference_apart() {
        let sp = [1.0, 1.0, 1.5];
        let dims = [40, 40, 28];
        let c = [19.5, 19.5, 13.5];
        let a = ball(dims, c, 15.0, sp);
        let b = ball(dims, c, 10.0, sp);
        let hd = hausdorff95_mm(a.view(), b.view(), sp).unwrap();
        // Voxelisation moves each surface by up to half a voxel diagonal.
        assert!((hd - 5.0).abs() <= 1.0, "{hd}");
        assert_eq!(hausdorff95_mm(a.view(), a.view(), sp), Some(0.0));
        let empty = Array3::from_elem(dims, false);
        assert_eq!(hausdorff95_mm(a.view(), empty.view(), sp), None);
    }

    #[test]
    fn hausdorff95_matches_brute_force_on_random_blobs() {
        let sp = [1.0, 0.8, 2.5];
        for seed in 0..3 {
            let a = random_mask([10, 12, 8], 45, seed);
            let b = random_mask([10, 12, 8], 45, seed + 100);
            let pts = |m: &Array3<bool>| -> Vec<[f64; 3]> {
                surface(m.view())
                    .indexed_iter()
                    .filter(|(_, v)| **v)
                    .map(|((i, j, k), _)| [i as f64 * sp[0], j as f64 * sp[1], k as f64 * sp[2]])
                    .collect()
            };
            let directed = |x: &[[f64; 3]], y: &[[f64; 3]]| {
                let mut d: Vec<f64> = x
                    .iter()
                    .map(|p| {
                        y.iter()
                            .map(|q| (0..3).map(|i| (p[i] - q[i]).powi(2)).sum::<f64>().sqrt())
                            .fold(f64::INFINITY, f64::min)
                    })
                    .collect();
                percentile(&mut d, 95.0).unwrap()
            };
            let (pa, pb) = (pts(&a), pts(&b));
            let want = directed(&pa, &pb).max(directed(&pb, &pa));
            let got = hausdorff95_mm(a.view(), b.view(), sp).unwrap();
            assert!((got - want).abs() < 1e-9, "seed {seed}: {got} vs {want}");
        }
    }

    #[test]
    fn percentile_interpolates_like_numpy() {
        // numpy.percentile([1, 2, 3, 4], 95) == 3.85
        let p = percentile(&mut [4.0, 1.0, 3.0, 2.0], 95.0).unwrap();
        assert!((p - 3.85).abs() < 1e-12, "{p}");
        assert_eq!(percentile(&mut [], 50.0), None);
    }

    #[test]
    fn volume_error_is_signed_and_relative() {
        let t = cube([10, 10, 10], [0, 0, 0], [4, 5, 5]); // 100 voxels
        let p = cube([10, 10, 10], [0, 0, 0], [5, 5, 5]); // 125 voxels
        assert_eq!(volume_error(p.view(), t.view()), Some(0.25));
        assert_eq!(volume_error(t.view(), p.view()), Some(-0.2));
        let empty = Array3::from_elem([10, 10, 10], false);
        assert_eq!(volume_error(p.view(), empty.view()), None);
    }
}
