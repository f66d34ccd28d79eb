//! Cost of resampling a volume to the model's spacing and the labels back:
//! the MNI152 2 mm grid (91 x 109 x 91) to 1.5 mm (121 x 145 x 121),
//! trilinear forward on the image, nearest-neighbour inverse on the labels.
//!
//! `cargo bench -p infl8-suite --bench resampling`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use infl8_core::preprocess::Resampling;
use nalgebra::Matrix4;
use ndarray::Array;

const DIMS: [usize; 3] = [91, 109, 91];
const SPACING: [f64; 3] = [2.0; 3];
const TARGET: [f64; 3] = [1.5; 3];

fn resampling(c: &mut Criterion) {
    let affine = Matrix4::new_nonuniform_scaling(&SPACING.into());
    let r = Resampling::new(&affine, DIMS, TARGET)
        .expect("valid spacings")
        .expect("2 mm to 1.5 mm resamples");
    let [dx, dy, dz] = r.dst_dims();
    let image = Array::from_shape_fn((1, DIMS[0], DIMS[1], DIMS[2]), |(_, x, y, z)| {
        ((x * 7 + y * 13 + z * 3) % 251) as f32
    });
    let labels = Array::from_shape_fn((1, dx, dy, dz), |(_, x, y, z)| ((x ^ y ^ z) & 3) as u8);

    let mut group = c.benchmark_group("resampling");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    let [sx, sy, sz] = DIMS;
    group.bench_function(
        format!("forward_linear_{sx}x{sy}x{sz}_to_{dx}x{dy}x{dz}"),
        |b| {
            b.iter(|| {
                r.forward_linear(black_box(image.view()))
                    .expect("the image is on the source grid")
            })
        },
    );
    group.bench_function(
        format!("inverse_nearest_u8_{dx}x{dy}x{dz}_to_{sx}x{sy}x{sz}"),
        |b| {
            b.iter(|| {
                r.inverse_nearest(black_box(labels.view()))
                    .expect("the labels are on the new grid")
            })
        },
    );
    group.finish();
}

criterion_group!(benches, resampling);
criterion_main!(benches);
