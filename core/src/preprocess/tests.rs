//! Tests of the preprocessing steps and their inverses.

use nalgebra::{Matrix3, Matrix4, Vector4};
use ndarray::{Array3, Array4, Axis};

use super::intensity::*;
use super::orientation::*;
use super::spacing::*;
use super::*;
use crate::volume::Volume;

fn world(a: &Matrix4<f64>, v: [usize; 3]) -> Vector4<f64> {
    a * Vector4::new(v[0] as f64, v[1] as f64, v[2] as f64, 1.0)
}

fn voxel_of(a: &Matrix4<f64>, w: &Vector4<f64>) -> [usize; 3] {
    let inv = a.try_inverse().unwrap();
    let v = inv * w;
    for i in 0..3 {
        assert!(
            (v[i] - v[i].round()).abs() < 1e-6,
            "not a voxel centre: {v}"
        );
    }
    [
        v[0].round() as usize,
        v[1].round() as usize,
        v[2].round() as usize,
    ]
}

fn coded(dims: [usize; 3], channels: usize) -> Array4<f32> {
    Array4::from_shape_fn((channels, dims[0], dims[1], dims[2]), |(c, x, y, z)| {
        (c * 1_000_000 + x * 10_000 + y * 100 + z) as f32
    })
}

const PERMS: [[usize; 3]; 6] = [
    [0, 1, 2],
    [0, 2, 1],
    [1, 0, 2],
    [1, 2, 0],
    [2, 0, 1],
    [2, 1, 0],
];

/// All 48 storage orders: voxel axis j runs along world axis p[j] with
/// sign from the flip bits.
fn all_orientations() -> Vec<Matrix4<f64>> {
    let spacing = [0.7, 1.3, 2.9];
    let mut out = Vec::new();
    for p in PERMS {
        for bits in 0..8 {
            let mut a = Matrix4::identity();
            for j in 0..3 {
                a[(j, j)] = 0.0;
            }
            for j in 0..3 {
                let sign = if bits & (1 << j) != 0 { -1.0 } else { 1.0 };
                a[(p[j], j)] = sign * spacing[j];
            }
            a[(0, 3)] = 12.5;
            a[(1, 3)] = -40.0;
            a[(2, 3)] = 7.25;
            out.push(a);
        }
    }
    out
}

#[test]
fn all_48_orientations_keep_world_positions_and_invert_exactly() {
    let dims = [4, 5, 6];
    let data = coded(dims, 2);
    let orientations = all_orientations();
    assert_eq!(orientations.len(), 48);
    for a in orientations {
        let vol = Volume::new(data.clone(), a);
        let spec = PreprocessSpec::default();
        let (out, inv) = preprocess(&vol, &spec).unwrap();
        // RAS: a positive diagonal.
        for i in 0..3 {
            assert!(out.affine[(i, i)] > 0.0, "{a} -> {}", out.affine);
        }
        for ((c, x, y, z), v) in data.indexed_iter() {
            let w = world(&a, [x, y, z]);
            let [i, j, k] = voxel_of(&out.affine, &w);
            assert_eq!(out.data[[c, i, j, k]], *v);
        }
        let back = inv.logits(out.data.clone()).unwrap();
        assert_eq!(back, data);
        let labels = out
            .data
            .index_axis(Axis(0), 0)
            .mapv(|v| (v as u32 % 251) as u8);
        let back = inv.labels(labels).unwrap();
        assert_eq!(
            back,
            data.index_axis(Axis(0), 0).mapv(|v| (v as u32 % 251) as u8)
        );
    }
}

#[test]
fn labels_follow_the_image_geometry_in_all_48_orientations() {
    let dims = [4, 5, 6];
    let labels = Array3::from_shape_fn(dims, |(x, y, z)| ((x * 31 + y * 7 + z) % 251) as u8);
    let resampled = PreprocessSpec {
        target_spacing: Some([1.0, 1.0, 1.0]),
        ..PreprocessSpec::default()
    };
    for a in all_orientations() {
        let vol = Volume::new(coded(dims, 1), a);
        // Without resampling the labels move exactly like the image's
        // voxels, whose values encode where they came from.
        let (out, inv) = preprocess(&vol, &PreprocessSpec::default()).unwrap();
        let moved = preprocess_labels(labels.view(), &inv).unwrap();
        for ((i, j, k), v) in moved.indexed_iter() {
            let code = out.data[[0, i, j, k]] as usize;
            let src = [code / 10_000, code / 100 % 100, code % 100];
            assert_eq!(*v, labels[src]);
        }
        assert_eq!(inv.labels(moved).unwrap(), labels);

        // With resampling each model voxel takes the label of the input
        // voxel nearest to it in world space (the spacings leave no
        // exact ties).
        let (out, inv) = preprocess(&vol, &resampled).unwrap();
        let moved = preprocess_labels(labels.view(), &inv).unwrap();
        assert_eq!(moved.shape(), &out.dims()[..]);
        let to_input = a.try_inverse().unwrap() * out.affine;
        for ((i, j, k), v) in moved.indexed_iter() {
            let p = to_input * Vector4::new(i as f64, j as f64, k as f64, 1.0);
            let q = [0, 1, 2].map(|d| p[d].round().clamp(0.0, (dims[d] - 1) as f64) as usize);
            assert_eq!(*v, labels[q], "{a}: model voxel {:?}", (i, j, k));
        }
    }
    let (_, inv) = preprocess(
        &Volume::new(coded(dims, 1), Matrix4::identity()),
        &PreprocessSpec::default(),
    )
    .unwrap();
    let err = preprocess_labels(Array3::zeros((4, 5, 7)).view(), &inv).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("[4, 5, 7]") && msg.contains("before preprocessing"),
        "{msg}"
    );
}

#[test]
fn oblique_affine_gets_a_proper_permutation() {
    // LPS-like storage, rotated 20 degrees about the S axis, axes stored
    // in the order (S, L, P).
    let (s, c) = 20f64.to_radians().sin_cos();
    #[rustfmt::skip]
    let rot = Matrix3::new(
        c, -s, 0.0,
        s, c, 0.0,
        0.0, 0.0, 1.0,
    );
    let dirs = Matrix3::new(0.0, -1.0, 0.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0);
    let lin = rot * dirs * Matrix3::from_diagonal(&nalgebra::Vector3::new(2.0, 0.8, 0.9));
    let mut a = Matrix4::identity();
    a.fixed_view_mut::<3, 3>(0, 0).copy_from(&lin);
    a[(0, 3)] = 30.0;
    let dims = [3, 7, 5];
    let r = Reorientation::to_ras(&a, dims);
    assert_eq!(r.perm, [1, 2, 0]);
    assert_eq!(r.flip, [true, true, false]);
    let data = coded(dims, 1);
    let vol = Volume::new(data.clone(), a);
    let (out, inv) = preprocess(&vol, &PreprocessSpec::default()).unwrap();
    for ((c, x, y, z), v) in data.indexed_iter() {
        let [i, j, k] = voxel_of(&out.affine, &world(&a, [x, y, z]));
        assert_eq!(out.data[[c, i, j, k]], *v);
    }
    for i in 0..3 {
        let col = out.affine.fixed_view::<3, 1>(0, i);
        let dominant = (0..3).max_by(|&p, &q| col[p].abs().total_cmp(&col[q].abs()));
        assert_eq!(dominant, Some(i));
        assert!(col[i] > 0.0);
    }
    assert_eq!(inv.logits(out.data).unwrap(), data);
}

#[test]
fn a_45_degree_tie_still_gives_a_permutation() {
    let (s, c) = 45f64.to_radians().sin_cos();
    let mut a = Matrix4::identity();
    a[(0, 0)] = c;
    a[(1, 0)] = s;
    a[(0, 1)] = -s;
    a[(1, 1)] = c;
    let r = Reorientation::to_ras(&a, [2, 3, 4]);
    let mut seen = r.perm;
    seen.sort_unstable();
    assert_eq!(seen, [0, 1, 2]);
}

fn diag(spacing: [f64; 3]) -> Matrix4<f64> {
    Matrix4::from_diagonal(&Vector4::new(spacing[0], spacing[1], spacing[2], 1.0))
}

#[test]
fn monai_grid_counts_voxel_centres_and_rounds_half_to_even() {
    // The lung CT of issue 19: 48 slices of 5 mm to 2 mm is 118 slices
    // (MONAI), not round(48 * 5 / 2) = 120.
    let r = Resampling::new(&diag([0.7, 0.7, 5.0]), [512, 512, 48], [1.5, 1.5, 2.0])
        .unwrap()
        .unwrap();
    // 511 * 0.7 / 1.5 + 1 = 239.47; 47 * 5 / 2 + 1 = 118.5 -> 118.
    assert_eq!(r.dst_dims(), [239, 239, 118]);
    // Axis-aligned: the first voxel centre stays, steps are the target.
    let err = (r.affine() - diag([1.5, 1.5, 2.0])).abs().max();
    assert!(err < 1e-12, "{}", r.affine());
}

#[test]
fn sheared_input_takes_the_3d_pass_and_samples_world_positions() {
    // A sheared affine: MONAI's grid drops the shear, so the new voxel
    // axes cut across the old ones and no 1D pass can follow them.
    #[rustfmt::skip]
    let a = Matrix4::new(
        1.0, 0.3, 0.0, 5.0,
        0.0, 1.0, 0.2, -3.0,
        0.0, 0.0, 2.0, 1.0,
        0.0, 0.0, 0.0, 1.0,
    );
    let dims = [12, 10, 8];
    let r = Resampling::new(&a, dims, [1.5, 1.5, 1.5]).unwrap().unwrap();
    assert!(!r.separable);
    // A field linear in world coordinates is reproduced exactly by
    // trilinear sampling wherever the sample lies inside the input.
    let field = |w: Vector4<f64>| (w[0] * 3.0 - w[1] * 2.0 + w[2]) as f32;
    let img = Array4::from_shape_fn((1, dims[0], dims[1], dims[2]), |(_, x, y, z)| {
        field(a * Vector4::new(x as f64, y as f64, z as f64, 1.0))
    });
    let out = r.forward_linear(img.view()).unwrap();
    let to_input = a.try_inverse().unwrap() * r.affine();
    let mut inside = 0;
    for ((_, i, j, k), v) in out.indexed_iter() {
        let o = Vector4::new(i as f64, j as f64, k as f64, 1.0);
        let p = to_input * o;
        if (0..3).all(|d| p[d] >= 0.0 && p[d] <= (dims[d] - 1) as f64) {
            inside += 1;
            let want = field(r.affine() * o);
            assert!((v - want).abs() < 1e-3, "{:?}: {v} vs {want}", (i, j, k));
        }
    }
    assert!(inside > out.len() / 3, "{inside} of {}", out.len());
    // And back: the inverse samples the new grid at the input's centres.
    let back = r.inverse_linear(out.view()).unwrap();
    assert_eq!(back.shape(), img.shape());
    // Where all 8 new-grid voxels around an input voxel hold exact
    // (unclamped) samples, the field comes back exactly.
    let to_new = r.affine().try_inverse().unwrap() * a;
    let dst = r.dst_dims();
    let exact = |c: [f64; 3]| {
        let p = to_input * Vector4::new(c[0], c[1], c[2], 1.0);
        (0..3).all(|d| p[d] >= 0.0 && p[d] <= (dims[d] - 1) as f64)
    };
    let mut inside = 0;
    for ((_, x, y, z), v) in back.indexed_iter() {
        let q = to_new * Vector4::new(x as f64, y as f64, z as f64, 1.0);
        let lo = [0, 1, 2].map(|d| q[d].floor());
        let cell_ok =
            (0..8).all(|bits| exact([0, 1, 2].map(|d| lo[d] + f64::from((bits >> d) & 1))));
        if cell_ok && (0..3).all(|d| q[d] >= 0.0 && q[d] <= (dst[d] - 1) as f64) {
            inside += 1;
            let want = img[[0, x, y, z]];
            assert!((v - want).abs() < 1e-3, "{:?}: {v} vs {want}", (x, y, z));
        }
    }
    assert!(inside > back.len() / 10, "{inside} of {}", back.len());
}

#[test]
fn integer_upsampling_of_labels_inverts_exactly() {
    let dims = [5, 4, 3];
    let labels = Array3::from_shape_fn(dims, |(x, y, z)| ((x * 7 + y * 3 + z) % 5) as u8);
    // Source spacing 3 x 2 x 1, target 1 x 1 x 0.5: integer factors;
    // (n - 1) * s / t + 1 voxels.
    let r = Resampling::new(&diag([3.0, 2.0, 1.0]), dims, [1.0, 1.0, 0.5])
        .unwrap()
        .unwrap();
    assert_eq!(r.dst_dims(), [13, 7, 5]);
    let up = r
        .forward_nearest(labels.view().insert_axis(Axis(0)))
        .unwrap();
    let back = r.inverse_nearest(up.view()).unwrap();
    assert_eq!(back.index_axis(Axis(0), 0), labels);

    // Images: up then back is exact at integer factors (weights 0).
    let img = coded(dims, 2);
    let up = r.forward_linear(img.view()).unwrap();
    let back = r.inverse_linear(up.view()).unwrap();
    assert_eq!(back, img);
    // Wrong shapes are errors, not panics.
    assert!(r.inverse_linear(img.view()).is_err());
    assert!(r.forward_linear(up.view()).is_err());
}

#[test]
fn downsampling_then_inverse_restores_the_sampled_voxels() {
    let dims = [8, 6, 4];
    let labels = Array3::from_shape_fn(dims, |(x, y, z)| ((x + 2 * y + 3 * z) % 7) as u8);
    let r = Resampling::new(&diag([1.0, 1.0, 1.0]), dims, [2.0, 2.0, 2.0])
        .unwrap()
        .unwrap();
    // 8 -> 4.5 -> 4, 6 -> 3.5 -> 4, 4 -> 2.5 -> 2: half to even.
    assert_eq!(r.dst_dims(), [4, 4, 2]);
    let down = r
        .forward_nearest(labels.view().insert_axis(Axis(0)))
        .unwrap();
    let back = r.inverse_nearest(down.view()).unwrap();
    assert_eq!(back.shape(), &[1, 8, 6, 4]);
    // Every voxel the coarse grid sampled comes back unchanged.
    for x in (0..8).step_by(2) {
        for y in (0..6).step_by(2) {
            for z in (0..4).step_by(2) {
                assert_eq!(back[[0, x, y, z]], labels[[x, y, z]]);
            }
        }
    }
}

#[test]
fn smooth_image_survives_up_and_down_resampling() {
    let dims = [20, 16, 12];
    let img = Array4::from_shape_fn((1, 20, 16, 12), |(_, x, y, z)| {
        (x as f32 * 0.3).sin() + (y as f32 * 0.2).cos() + z as f32 * 0.1
    });
    let r = Resampling::new(&diag([1.0, 1.2, 2.0]), dims, [0.7, 0.5, 1.1])
        .unwrap()
        .unwrap();
    let up = r.forward_linear(img.view()).unwrap();
    let back = r.inverse_linear(up.view()).unwrap();
    assert_eq!(back.shape(), img.shape());
    let err = (&back - &img).mapv(f32::abs).fold(0.0f32, |m, v| m.max(*v));
    assert!(err < 0.05, "max error {err}");
}

#[test]
fn resampling_geometry_follows_the_spec() {
    let mut a = Matrix4::identity();
    a[(0, 0)] = -1.5;
    a[(1, 1)] = 1.5;
    a[(2, 2)] = 3.0;
    let vol = Volume::new(coded([10, 10, 7], 1), a);
    let spec = PreprocessSpec {
        reorient: false,
        target_spacing: Some([1.0, 1.5, 2.0]),
        normalization: Normalization::None,
    };
    let (out, inv) = preprocess(&vol, &spec).unwrap();
    // n' = round((n - 1) * s / t + 1), half to even: 14.5 -> 14.
    assert_eq!(out.dims(), [14, 10, 10]);
    assert_eq!(out.spacing, [1.0, 1.5, 2.0]);
    assert_eq!(out.affine[(0, 0)], -1.0);
    // First voxel centre preserved; y untouched (matching spacing).
    assert_eq!(out.affine.column(3), a.column(3));
    assert_eq!(inv.original_dims(), [10, 10, 7]);
    assert_eq!(inv.model_dims(), [14, 10, 10]);
    // The data is linear in the index, which trilinear reproduces:
    // x' = 2 sits at x = 2 / 1.5, z' = 4 at z = 4 * 2 / 3.
    let expect = (2.0 / 1.5) * 10_000.0 + 300.0 + 4.0 * 2.0 / 3.0;
    assert!((f64::from(out.data[[0, 2, 3, 4]]) - expect).abs() < 1e-2);
}

#[test]
fn matching_spacing_skips_resampling() {
    let a = diag([1.0, 2.0, 3.0]);
    assert!(
        Resampling::new(&a, [4, 4, 4], [1.0, 2.0 * (1.0 + 1e-8), 3.0])
            .unwrap()
            .is_none()
    );
    // MONAI's tolerance: within 1e-3 mm of the target keeps the spacing.
    assert!(
        Resampling::new(&a, [4, 4, 4], [1.0009, 2.0, 2.9991])
            .unwrap()
            .is_none()
    );
    assert!(
        Resampling::new(&a, [4, 4, 4], [1.0011, 2.0, 3.0])
            .unwrap()
            .is_some()
    );
}

#[test]
fn inverse_checks_shapes() {
    let vol = Volume::new(coded([4, 5, 6], 1), Matrix4::identity());
    let (_, inv) = preprocess(&vol, &PreprocessSpec::default()).unwrap();
    let err = inv.labels(Array3::zeros((4, 5, 7))).unwrap_err();
    assert!(err.to_string().contains("[4, 5, 7]"), "{err}");
    assert!(inv.logits(Array4::zeros((2, 4, 6, 5))).is_err());
    assert!(inv.logits(Array4::zeros((0, 4, 5, 6))).is_err());
}

#[test]
fn window_values_hand_checked() {
    let mut v = [-1100.0, -1000.0, 0.0, 200.0, 400.0, 3000.0];
    normalize(
        &mut v,
        &Normalization::IntensityWindow {
            lo: -1000.0,
            hi: 400.0,
        },
    );
    let expect = [0.0, 0.0, 1000.0 / 1400.0, 1200.0 / 1400.0, 1.0, 1.0];
    for (a, b) in v.iter().zip(expect) {
        assert!((a - b).abs() < 1e-6, "{v:?}");
    }
}

#[test]
fn zscore_values_hand_checked() {
    // mean 5, population std 2.
    let mut v = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
    normalize(&mut v, &Normalization::Zscore { nonzero: false });
    assert_eq!(v, [-1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 1.0, 2.0]);

    // Zeros are excluded from the stats and left alone.
    let mut v = [0.0, 2.0, 0.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
    normalize(&mut v, &Normalization::Zscore { nonzero: true });
    assert_eq!(v, [0.0, -1.5, 0.0, -0.5, -0.5, -0.5, 0.0, 0.0, 1.0, 2.0]);

    // Constant: std 0 subtracts the mean only.
    let mut v = [3.0; 4];
    normalize(&mut v, &Normalization::Zscore { nonzero: false });
    assert_eq!(v, [0.0; 4]);
}

#[test]
fn head_zscore_ignores_how_much_air_surrounds_the_head() {
    // A "head" of values 100..=199 inside air of 0..=4: Otsu's cut falls
    // between the two, so the stats are the head's (mean 149.5) however
    // many air voxels there are.
    let head: Vec<f32> = (100..200).map(|v| v as f32).collect();
    let with_air = |n: usize| {
        let mut v: Vec<f32> = (0..n).map(|i| (i % 5) as f32).collect();
        v.extend(&head);
        normalize(&mut v, &Normalization::HeadZscore);
        v
    };
    let small = with_air(50);
    let large = with_air(5000);
    let std = (head
        .iter()
        .map(|v| (f64::from(*v) - 149.5).powi(2))
        .sum::<f64>()
        / 100.0)
        .sqrt();
    for (i, h) in head.iter().enumerate() {
        let want = (f64::from(*h) - 149.5) / std;
        assert!((f64::from(small[50 + i]) - want).abs() < 1e-5, "{i}");
        assert!((f64::from(large[5000 + i]) - want).abs() < 1e-5, "{i}");
    }
    // Air is changed too: dark and well below the head.
    assert!((f64::from(small[0]) - (0.0 - 149.5) / std).abs() < 1e-5);
    let raw: Vec<f32> = (0..50)
        .map(|i| (i % 5) as f32)
        .chain(head.clone())
        .collect();
    let t = otsu_threshold(&raw).unwrap();
    assert!(t > 4.0 && t <= 100.0, "{t}");

    // A constant channel has no threshold and is left alone.
    let mut v = [7.0f32; 4];
    normalize(&mut v, &Normalization::HeadZscore);
    assert_eq!(v, [7.0; 4]);
    // Whole-volume z-score, for contrast, moves with the air.
    let mut a: Vec<f32> = (0..50)
        .map(|i| (i % 5) as f32)
        .chain(head.clone())
        .collect();
    let mut b: Vec<f32> = (0..5000)
        .map(|i| (i % 5) as f32)
        .chain(head.clone())
        .collect();
    normalize(&mut a, &Normalization::Zscore { nonzero: false });
    normalize(&mut b, &Normalization::Zscore { nonzero: false });
    assert!((a[50] - b[5000]).abs() > 0.5);
}

#[test]
fn head_zscore_is_spelled_head_zscore_in_manifests() {
    let n: Normalization = serde_json::from_str(r#"{"kind":"head_zscore"}"#).unwrap();
    assert_eq!(n, Normalization::HeadZscore);
}

#[test]
fn percentiles_match_numpy() {
    // numpy.percentile(np.arange(101.), [0.5, 99.5]) == [0.5, 99.5]
    let v: Vec<f32> = (0..=100).rev().map(|i| i as f32).collect();
    let (lo, hi) = percentiles(&v, 0.5, 99.5);
    assert!(
        (lo - 0.5).abs() < 1e-9 && (hi - 99.5).abs() < 1e-9,
        "{lo} {hi}"
    );
    // numpy.percentile([1, 2, 3, 4, 10], [25, 90]) == [2.0, 7.6]
    let (lo, hi) = percentiles(&[10.0, 1.0, 4.0, 3.0, 2.0], 25.0, 90.0);
    assert!(
        (lo - 2.0).abs() < 1e-9 && (hi - 7.6).abs() < 1e-6,
        "{lo} {hi}"
    );
    let (lo, hi) = percentiles(&[5.0], 1.0, 99.0);
    assert_eq!((lo, hi), (5.0, 5.0));

    let mut v = [10.0, 1.0, 4.0, 3.0, 2.0];
    normalize(&mut v, &Normalization::Percentile { lo: 25.0, hi: 90.0 });
    let expect = [1.0, 0.0, 2.0 / 5.6, 1.0 / 5.6, 0.0];
    for (a, b) in v.iter().zip(expect) {
        assert!((f64::from(*a) - b).abs() < 1e-6, "{v:?}");
    }
}

#[test]
fn spec_validation_and_serde() {
    let vol = Volume::new(coded([2, 2, 2], 1), Matrix4::identity());
    for bad in [
        Normalization::IntensityWindow { lo: 1.0, hi: 1.0 },
        Normalization::IntensityWindow { lo: 2.0, hi: 1.0 },
        Normalization::Percentile { lo: 50.0, hi: 10.0 },
        Normalization::Percentile { lo: -1.0, hi: 10.0 },
    ] {
        let spec = PreprocessSpec {
            normalization: bad,
            ..PreprocessSpec::default()
        };
        assert!(matches!(
            preprocess(&vol, &spec),
            Err(PreprocessError::Spec(_))
        ));
    }
    let spec = PreprocessSpec {
        target_spacing: Some([1.0, 0.0, 1.0]),
        ..PreprocessSpec::default()
    };
    assert!(preprocess(&vol, &spec).is_err());

    let spec: PreprocessSpec = serde_json::from_str(
        r#"{"target_spacing": [1.5, 1.5, 2.0],
            "normalization": {"kind": "window", "lo": -100, "hi": 240}}"#,
    )
    .unwrap();
    assert!(spec.reorient);
    assert_eq!(
        spec.normalization,
        Normalization::IntensityWindow {
            lo: -100.0,
            hi: 240.0
        }
    );
    let n: Normalization = serde_json::from_str(r#"{"kind": "zscore"}"#).unwrap();
    assert_eq!(n, Normalization::Zscore { nonzero: false });
    let n: Normalization =
        serde_json::from_str(r#"{"kind": "percentile", "lo": 0.5, "hi": 99.5}"#).unwrap();
    assert_eq!(n, Normalization::Percentile { lo: 0.5, hi: 99.5 });
    assert!(
        serde_json::from_str::<Normalization>(r#"{"kind": "zscore", "nonzer": true}"#).is_err()
    );
    let json = serde_json::to_string(&Normalization::None).unwrap();
    assert_eq!(json, r#"{"kind":"none"}"#);
}

#[test]
fn degenerate_affine_is_refused() {
    let mut a = Matrix4::identity();
    a[(2, 2)] = 0.0;
    let vol = Volume::new(coded([2, 2, 2], 1), a);
    assert!(matches!(
        preprocess(&vol, &PreprocessSpec::default()),
        Err(PreprocessError::Input(_))
    ));
}
