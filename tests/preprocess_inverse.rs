//! The same anatomy stored in different voxel orders must segment to the
//! same labels in world space: preprocess -> voxelwise threshold -> inverse
//! -> (write, read) and compare voxel centres by their world coordinates.

use infl8_core::Volume;
use infl8_core::nifti_io::{DataType, ReadLimits, read_volume, write_labels, write_volume};
use infl8_core::preprocess::{Normalization, PreprocessSpec, preprocess};
use nalgebra::{Matrix4, Vector4};
use ndarray::{Array3, Array4, Axis, Zip};

const DIMS: [usize; 3] = [23, 19, 11];

/// A smooth blob plus a gradient on a RAS grid of 0.8 x 1.1 x 2.5 mm.
fn ras_volume() -> Volume {
    let data = Array4::from_shape_fn((1, DIMS[0], DIMS[1], DIMS[2]), |(_, x, y, z)| {
        let (fx, fy, fz) = (x as f32 - 10.0, y as f32 - 8.0, (z as f32 - 5.0) * 3.0);
        let r2 = fx * fx + fy * fy + fz * fz;
        100.0 * (-r2 / 40.0).exp() + x as f32 * 0.5 - 40.0
    });
    #[rustfmt::skip]
    let affine = Matrix4::new(
        0.8, 0.0, 0.0, -12.0,
        0.0, 1.1, 0.0, 30.0,
        0.0, 0.0, 2.5, 4.0,
        0.0, 0.0, 0.0, 1.0,
    );
    Volume::new(data, affine)
}

/// Re-store `vol` with voxel axis `j` of the new volume being old axis
/// `perm[j]`, reversed where `flip[j]`; the affine follows so every voxel
/// keeps its world position.
fn restore(vol: &Volume, perm: [usize; 3], flip: [bool; 3]) -> Volume {
    let mut view = vol
        .data
        .view()
        .permuted_axes([0, 1 + perm[0], 1 + perm[1], 1 + perm[2]]);
    let mut t = Matrix4::zeros();
    t[(3, 3)] = 1.0;
    for j in 0..3 {
        let old = perm[j];
        if flip[j] {
            view.invert_axis(Axis(1 + j));
            t[(old, j)] = -1.0;
            t[(old, 3)] = (vol.dims()[old] - 1) as f64;
        } else {
            t[(old, j)] = 1.0;
        }
    }
    Volume::new(view.as_standard_layout().into_owned(), vol.affine * t)
}

fn spec() -> PreprocessSpec {
    PreprocessSpec {
        reorient: true,
        // Non-integer ratios on every axis: real interpolation both ways.
        target_spacing: Some([1.3, 0.7, 1.9]),
        normalization: Normalization::Zscore { nonzero: false },
    }
}

/// The full runtime path on one volume: labels and logits on its own grid.
fn segment(vol: &Volume) -> (Array3<u8>, Array4<f32>) {
    let (prepared, inverse) = preprocess(vol, &spec()).unwrap();
    let fg = prepared
        .data
        .index_axis(Axis(0), 0)
        .mapv(|v| (v > 0.5) as u8);
    let logits = prepared.data.mapv(|v| v * 2.0 - 1.0);
    let labels = inverse.labels(fg).unwrap();
    let logits = inverse.logits(logits).unwrap();
    assert_eq!(labels.shape(), vol.dims());
    assert_eq!(&logits.shape()[1..], vol.dims());
    (labels, logits)
}

fn to_voxel(affine: &Matrix4<f64>, world: &Vector4<f64>) -> [usize; 3] {
    let v = affine.try_inverse().unwrap() * world;
    let r = [v[0].round(), v[1].round(), v[2].round()];
    for i in 0..3 {
        // Files store the affine in f32.
        assert!((v[i] - r[i]).abs() < 1e-3, "not a voxel centre: {v}");
    }
    [r[0] as usize, r[1] as usize, r[2] as usize]
}

/// Compare two label maps voxel by voxel through world space.
fn assert_same_in_world(
    a: &Array3<u8>,
    aff_a: &Matrix4<f64>,
    b: &Array3<u8>,
    aff_b: &Matrix4<f64>,
) {
    let mut foreground = 0;
    for ((x, y, z), v) in a.indexed_iter() {
        let w = aff_a * Vector4::new(x as f64, y as f64, z as f64, 1.0);
        let [i, j, k] = to_voxel(aff_b, &w);
        assert_eq!(*v, b[[i, j, k]], "voxel ({x}, {y}, {z})");
        foreground += usize::from(*v);
    }
    // The test means nothing if the threshold keeps all or nothing.
    assert!(foreground > 20 && foreground < a.len() - 20, "{foreground}");
}

#[test]
fn one_axis_flipped_in_storage_segments_identically() {
    let a = ras_volume();
    let b = restore(&a, [0, 1, 2], [true, false, false]);
    let (la, pa) = segment(&a);
    let (lb, pb) = segment(&b);
    assert_same_in_world(&la, &a.affine, &lb, &b.affine);
    // The flip is exact, so the logits agree exactly too.
    let mut pb_back = pb.view();
    pb_back.invert_axis(Axis(1));
    assert_eq!(pa, pb_back);
}

#[test]
fn every_storage_order_segments_identically() {
    let a = ras_volume();
    let (la, _) = segment(&a);
    for perm in [[0, 1, 2], [2, 0, 1], [1, 2, 0], [0, 2, 1]] {
        for bits in [0u8, 1, 2, 4, 7] {
            let flip = [bits & 1 != 0, bits & 2 != 0, bits & 4 != 0];
            let b = restore(&a, perm, flip);
            let (lb, _) = segment(&b);
            assert_same_in_world(&la, &a.affine, &lb, &b.affine);
        }
    }
}

#[test]
fn through_files_results_overlay_in_world_space() {
    let dir = tempfile::tempdir().unwrap();
    let a = ras_volume();
    // LPS storage with z reversed: what many DICOM converters write.
    let b = restore(&a, [1, 0, 2], [true, true, true]);
    let mut labels = Vec::new();
    for (name, vol) in [("a", &a), ("b", &b)] {
        let src = dir.path().join(format!("{name}.nii.gz"));
        write_volume(&src, vol, DataType::F32).unwrap();
        let input = read_volume(&src, &ReadLimits::default()).unwrap();
        let (l, _) = segment(&input);
        let out = dir.path().join(format!("{name}_seg.nii.gz"));
        write_labels(&out, l.view(), &input).unwrap();
        let seg = read_volume(&out, &ReadLimits::default()).unwrap();
        let l = seg.data.index_axis(Axis(0), 0).mapv(|v| v as u8);
        labels.push((l, seg.affine));
    }
    let (la, aa) = &labels[0];
    let (lb, ab) = &labels[1];
    assert_same_in_world(la, aa, lb, ab);
}

#[test]
fn oblique_volume_round_trips_to_its_own_grid() {
    // 20 degrees about S: reorientation picks the nearest axes, resampling
    // keeps the obliqueness; the inverse must land exactly on the input grid.
    let a = ras_volume();
    let (s, c) = 20f64.to_radians().sin_cos();
    #[rustfmt::skip]
    let rot = Matrix4::new(
        c, -s, 0.0, 0.0,
        s, c, 0.0, 0.0,
        0.0, 0.0, 1.0, 0.0,
        0.0, 0.0, 0.0, 1.0,
    );
    let oblique = Volume::new(a.data.clone(), rot * a.affine);
    let b = restore(&oblique, [2, 1, 0], [false, true, false]);
    let (prepared, inverse) = preprocess(&b, &spec()).unwrap();
    // Obliqueness is kept: the reoriented affine is still rotated.
    assert!(prepared.affine[(1, 0)].abs() > 0.1);
    let (la, _) = segment(&oblique);
    let (lb, _) = segment(&b);
    assert_same_in_world(&la, &oblique.affine, &lb, &b.affine);
    assert_eq!(inverse.original_dims(), b.dims());
    // Logits that are constant per class come back constant.
    let k = Array4::from_shape_fn(
        (
            2,
            prepared.dims()[0],
            prepared.dims()[1],
            prepared.dims()[2],
        ),
        |(k, ..)| k as f32,
    );
    let back = inverse.logits(k).unwrap();
    Zip::indexed(&back).for_each(|(k, ..), v| assert_eq!(*v, k as f32));
}
