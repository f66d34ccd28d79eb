//! Acquisition variants of the training cases, made once when the data is
//! loaded: each case is also seen tilted, with thick slices along a random
//! axis, stored in another order, and under a bias field with Rician noise,
//! on its own grid before the runtime's preprocessing, so the model learns
//! from what clinical scans (5-7 mm slices, tilted planning) look like after
//! infl8 resamples them. The window sampler's augmentations come on top.

use ndarray::{Array4, Axis};
use serde::{Deserialize, Serialize};

use infl8_core::volume::{Volume, spacing_of};

use super::sample::Rng;
use crate::data::StoredCase;
use crate::degrade::{self, DegradeError, Pair};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Variants {
    /// Variants made of every training case (0: none).
    pub per_case: usize,
    /// Slice thickness range (mm) of the thick-slice simulation, along a
    /// random voxel axis; `thick_fraction` of the variants get it.
    pub thick_mm: [f64; 2],
    pub thick_fraction: f64,
    /// Largest tilt (degrees) about each of the left-right and
    /// anterior-posterior axes, uniform in `± tilt_deg`.
    pub tilt_deg: f64,
    /// Store every variant in a random axis order with random flips.
    pub reorient: bool,
    /// Largest bias field strength (multipliers within `1 / (1 + a)`..`1 + a`)
    /// and Rician noise level (fraction of the brain's median), each
    /// uniform from 0.
    pub bias: f64,
    pub rician: f64,
}

impl Default for Variants {
    fn default() -> Self {
        Variants {
            per_case: 0,
            thick_mm: [3.0, 6.0],
            thick_fraction: 0.7,
            tilt_deg: 15.0,
            reorient: true,
            bias: 0.3,
            rician: 0.05,
        }
    }
}

impl Variants {
    pub fn check(&self) -> Result<(), String> {
        let [lo, hi] = self.thick_mm;
        let finite_nonneg = |v: f64| v.is_finite() && v >= 0.0;
        if !(lo > 0.0 && hi >= lo && hi.is_finite()) {
            return Err(format!(
                "train.variants.thick_mm must be an increasing positive range, got {:?}",
                self.thick_mm
            ));
        }
        if !(0.0..=1.0).contains(&self.thick_fraction) {
            return Err("train.variants.thick_fraction must be in [0, 1]".into());
        }
        if !(finite_nonneg(self.tilt_deg) && self.tilt_deg <= 45.0) {
            return Err("train.variants.tilt_deg must be in [0, 45]".into());
        }
        if !(finite_nonneg(self.bias) && finite_nonneg(self.rician)) {
            return Err("train.variants.bias and rician must be >= 0".into());
        }
        Ok(())
    }

    /// Variant `index` of `stored`, drawn from `seed`: the same inputs give
    /// the same voxels, so an interrupted run resumes on the same data.
    pub fn make(
        &self,
        stored: &StoredCase,
        index: usize,
        seed: u64,
    ) -> Result<StoredCase, DegradeError> {
        let mut rng = Rng::new(seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let label = stored.label.mapv(f32::from).insert_axis(Axis(0));
        let mut pair = Pair::new(
            stored.image.clone(),
            Volume::new(label, stored.image.affine),
        )?;
        let spacing = spacing_of(&pair.image.affine);
        if self.tilt_deg > 0.0 {
            let t = self.tilt_deg;
            let angles = [rng.range(-t, t), rng.range(-t, t), 0.0];
            let (affine, dims) = degrade::rotated_grid(&pair.image, spacing, angles)?;
            pair = degrade::resample(&pair, affine, dims)?;
        }
        if rng.uniform() < self.thick_fraction {
            let axis = rng.below(3);
            let mm = rng.range(self.thick_mm[0], self.thick_mm[1]);
            // Never thinner than the voxels already are.
            pair = degrade::thick_slices(&pair, axis, mm.max(spacing[axis]))?;
        }
        if self.reorient {
            let mut axes = [0, 1, 2];
            for i in (1..3).rev() {
                axes.swap(i, rng.below(i + 1));
            }
            let flip = [0; 3].map(|_| rng.uniform() < 0.5);
            pair = degrade::reorient(&pair, axes, flip)?;
        }
        let (bias, noise) = (rng.range(0.0, self.bias), rng.range(0.0, self.rician));
        if self.bias > 0.0 || self.rician > 0.0 {
            pair = degrade::bias_noise(&pair, bias, noise, rng.next_u64())?;
        }
        let mut case = stored.case.clone();
        case.id = format!("{}~{index}", case.id);
        Ok(StoredCase {
            case,
            label: labels_of(&pair.label.data),
            image: pair.image,
        })
    }
}

/// Labels stay exact integers through nearest-voxel resampling.
fn labels_of(data: &Array4<f32>) -> ndarray::Array3<u8> {
    data.index_axis(Axis(0), 0)
        .mapv(|v| v.round().clamp(0.0, 255.0) as u8)
}

#[cfg(test)]
mod tests {
    use nalgebra::Matrix4;
    use ndarray::Array3;

    use super::*;
    use crate::data::Case;

    fn head() -> StoredCase {
        // A bright ball (label 1) in a 24^3 grid of 2 mm voxels.
        let n = 24;
        let label = Array3::from_shape_fn((n, n, n), |(i, j, k)| {
            let d = |v: usize| (v as f64 - 11.5).powi(2);
            u8::from(d(i) + d(j) + d(k) < 64.0)
        });
        let image = label
            .mapv(|l| 10.0 + 90.0 * f32::from(l))
            .insert_axis(Axis(0));
        let mut affine = Matrix4::identity() * 2.0;
        affine[(3, 3)] = 1.0;
        StoredCase {
            case: Case {
                id: "ball".into(),
                image: "ball_image.nii.gz".into(),
                label: "ball_label.nii.gz".into(),
            },
            image: Volume::new(image, affine),
            label,
        }
    }

    #[test]
    fn a_variant_is_reproducible_and_keeps_the_labels_on_the_image() {
        let v = Variants {
            per_case: 2,
            thick_fraction: 1.0,
            ..Variants::default()
        };
        let stored = head();
        let a = v.make(&stored, 0, 7).unwrap();
        let b = v.make(&stored, 0, 7).unwrap();
        let c = v.make(&stored, 1, 7).unwrap();
        assert_eq!(a.case.id, "ball~0");
        assert_eq!(a.image.data, b.image.data);
        assert_eq!(a.label, b.label);
        assert_ne!(
            a.image.affine, c.image.affine,
            "another index, another variant"
        );
        for s in [&a, &c] {
            assert_eq!(
                s.image.dims(),
                [s.label.dim().0, s.label.dim().1, s.label.dim().2]
            );
            // The ball survives, and its voxels stay the bright ones.
            let inside: Vec<f32> = s
                .label
                .indexed_iter()
                .filter(|(_, l)| **l == 1)
                .map(|((i, j, k), _)| s.image.data[(0, i, j, k)])
                .collect();
            assert!(inside.len() > 50, "{}", inside.len());
            let mean = inside.iter().sum::<f32>() / inside.len() as f32;
            assert!(mean > 40.0, "{mean}");
            // Thick slices: one axis now has voxels of 3-6 mm.
            let sp = spacing_of(&s.image.affine);
            assert!(sp.iter().any(|v| (3.0..=6.0 + 1e-9).contains(v)), "{sp:?}");
        }
    }

    #[test]
    fn bad_settings_are_refused() {
        let bad = Variants {
            thick_mm: [4.0, 2.0],
            ..Variants::default()
        };
        assert!(bad.check().is_err());
        let bad = Variants {
            tilt_deg: 90.0,
            ..Variants::default()
        };
        assert!(bad.check().is_err());
        assert!(Variants::default().check().is_ok());
    }
}
