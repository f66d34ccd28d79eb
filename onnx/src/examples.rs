//! Small models built in code: the example model shipped for trying the
//! runtime before a trained model is at hand, and fixtures for tests.

use crate::builder::{Attr, Dim, GraphBuilder};
use crate::proto::ModelProto;

/// Head-versus-background segmenter for intensity-normalised MRI.
///
/// One 3x3x3 convolution: channel 1 is `gain * (mean3x3x3(x) - threshold)`
/// and channel 0 its negative, so the argmax is "smoothed intensity above
/// threshold". Crude, but a genuine network run through the same path a
/// trained model takes (windows, blending, argmax, inverse resampling).
pub fn head_mask_model(roi: [i64; 3], threshold: f32, gain: f32) -> ModelProto {
    let mut g = GraphBuilder::new("infl8_example_head_mask");
    let x = g.input(
        "image",
        &[
            Dim::Symbolic("N"),
            Dim::Fixed(1),
            Dim::Fixed(roi[0]),
            Dim::Fixed(roi[1]),
            Dim::Fixed(roi[2]),
        ],
    );
    let k = gain / 27.0;
    let mut w = vec![-k; 27];
    w.extend(std::iter::repeat_n(k, 27));
    let w = g.weight("head.weight", &[2, 1, 3, 3, 3], &w);
    let b = g.weight("head.bias", &[2], &[gain * threshold, -gain * threshold]);
    g.node_named(
        "Conv",
        "head/Conv",
        &[&x, &w, &b],
        &["logits"],
        vec![
            ("kernel_shape", Attr::Ints(vec![3, 3, 3])),
            ("pads", Attr::Ints(vec![1, 1, 1, 1, 1, 1])),
            ("strides", Attr::Ints(vec![1, 1, 1])),
        ],
    );
    g.output(
        "logits",
        &[
            Dim::Symbolic("N"),
            Dim::Fixed(2),
            Dim::Fixed(roi[0]),
            Dim::Fixed(roi[1]),
            Dim::Fixed(roi[2]),
        ],
    );
    g.finish("infl8-example")
}

/// A pointwise 3D model: `out[c] = scale[c] * x + bias[c]` for `classes`
/// output channels. Fully convolutional with symbolic batch and spatial
/// dims: handy for exact checks in tests.
pub fn pointwise_model(scale: &[f32], bias: &[f32], in_channels: i64) -> ModelProto {
    let classes = scale.len() as i64;
    let mut g = GraphBuilder::new("infl8_pointwise");
    let x = g.input(
        "image",
        &[
            Dim::Symbolic("N"),
            Dim::Fixed(in_channels),
            Dim::Symbolic("X"),
            Dim::Symbolic("Y"),
            Dim::Symbolic("Z"),
        ],
    );
    // Each output channel sees the mean of the input channels.
    let mut w = Vec::new();
    for s in scale {
        for _ in 0..in_channels {
            w.push(s / in_channels as f32);
        }
    }
    let w = g.weight("pw.weight", &[classes, in_channels, 1, 1, 1], &w);
    let b = g.weight("pw.bias", &[classes], bias);
    g.node_named(
        "Conv",
        "pw/Conv",
        &[&x, &w, &b],
        &["logits"],
        vec![("kernel_shape", Attr::Ints(vec![1, 1, 1]))],
    );
    g.output(
        "logits",
        &[
            Dim::Symbolic("N"),
            Dim::Fixed(classes),
            Dim::Symbolic("X"),
            Dim::Symbolic("Y"),
            Dim::Symbolic("Z"),
        ],
    );
    g.finish("infl8-test")
}

/// `n` deterministic pseudo-random values in `[lo, hi)` (xorshift64): the
/// same sequence for the same seed on every platform, for fixtures and
/// conformance inputs.
pub fn pseudo_random(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            lo + (hi - lo) * ((x >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

/// Deterministic weights in `[-scale, scale)`, for fixtures.
fn fixture_weights(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    pseudo_random(n, seed, -scale, scale)
}

/// A miniature ViT segmenter for quantization tests: strided Conv3d patch
/// embedding (8 channels, 2x2x2 patches), one pre-norm attention block
/// (LayerNorm, Q/K/V/output MatMuls, Softmax, residual) and a ConvTranspose
/// head back to full resolution with 2 classes. Input `[N, 1, 8, 8, 8]`.
/// Every op a real inflated ViT uses where quantization matters.
pub fn conv_attention_model() -> ModelProto {
    const C: i64 = 8;
    const T: i64 = 64;
    let mut g = GraphBuilder::new("infl8_conv_attention");
    let spatial = |c: i64| {
        [
            Dim::Symbolic("N"),
            Dim::Fixed(c),
            Dim::Fixed(8),
            Dim::Fixed(8),
            Dim::Fixed(8),
        ]
    };
    let x = g.input("image", &spatial(1));
    let w = g.weight(
        "embed.weight",
        &[C, 1, 2, 2, 2],
        &fixture_weights(64, 1, 0.35),
    );
    let b = g.weight("embed.bias", &[C], &fixture_weights(8, 2, 0.1));
    let e = g.node(
        "Conv",
        &[&x, &w, &b],
        vec![
            ("kernel_shape", Attr::Ints(vec![2, 2, 2])),
            ("strides", Attr::Ints(vec![2, 2, 2])),
        ],
    );
    let e = g.node("Relu", &[&e], vec![]);
    let to_tokens = g.weight_i64("to_tokens", &[3], &[0, C, T]);
    let t = g.node("Reshape", &[&e, &to_tokens], vec![]);
    let t = g.node(
        "Transpose",
        &[&t],
        vec![("perm", Attr::Ints(vec![0, 2, 1]))],
    );
    let gamma = g.weight("norm.weight", &[C], &[1.0; C as usize]);
    let beta = g.weight("norm.bias", &[C], &[0.0; C as usize]);
    let n = g.node(
        "LayerNormalization",
        &[&t, &gamma, &beta],
        vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(1e-5))],
    );
    let proj = |g: &mut GraphBuilder, name: &str, seed: u64, input: &str| {
        let w = g.weight(name, &[C, C], &fixture_weights(64, seed, 0.6));
        g.node("MatMul", &[input, &w], vec![])
    };
    let q = proj(&mut g, "attn.q.weight", 3, &n);
    let k = proj(&mut g, "attn.k.weight", 4, &n);
    let v = proj(&mut g, "attn.v.weight", 5, &n);
    let kt = g.node(
        "Transpose",
        &[&k],
        vec![("perm", Attr::Ints(vec![0, 2, 1]))],
    );
    let s = g.node("MatMul", &[&q, &kt], vec![]);
    let scale = g.weight("attn.scale", &[], &[1.0 / (C as f32).sqrt()]);
    let s = g.node("Mul", &[&s, &scale], vec![]);
    let p = g.node("Softmax", &[&s], vec![("axis", Attr::Int(-1))]);
    let a = g.node("MatMul", &[&p, &v], vec![]);
    let o = proj(&mut g, "attn.out.weight", 6, &a);
    let r = g.node("Add", &[&t, &o], vec![]);
    let r = g.node(
        "Transpose",
        &[&r],
        vec![("perm", Attr::Ints(vec![0, 2, 1]))],
    );
    let to_grid = g.weight_i64("to_grid", &[5], &[0, C, 4, 4, 4]);
    let r = g.node("Reshape", &[&r, &to_grid], vec![]);
    let w = g.weight(
        "head.weight",
        &[C, 2, 2, 2, 2],
        &fixture_weights(128, 7, 0.35),
    );
    let b = g.weight("head.bias", &[2], &[0.05, -0.05]);
    g.node_named(
        "ConvTranspose",
        "head/ConvTranspose",
        &[&r, &w, &b],
        &["logits"],
        vec![
            ("kernel_shape", Attr::Ints(vec![2, 2, 2])),
            ("strides", Attr::Ints(vec![2, 2, 2])),
        ],
    );
    g.output("logits", &spatial(2));
    g.finish("infl8-test")
}

/// Bias of [`conv3d_model`]'s two output channels.
pub const CONV3D_BIAS: [f32; 2] = [0.5, -1.0];

/// [`conv3d_model`]'s weights `[2, 1, 3, 3, 3]`: channel 0 ramps
/// (k + 1) / 27 over the 27 taps in C order, channel 1 alternates ±0.25 like
/// a checkerboard.
pub fn conv3d_weight(o: usize, z: usize, y: usize, x: usize) -> f32 {
    if o == 0 {
        (z * 9 + y * 3 + x + 1) as f32 / 27.0
    } else if (z + y + x).is_multiple_of(2) {
        0.25
    } else {
        -0.25
    }
}

/// The backend tests' fixture: `image [batch, 1, 4, 4, 4] -> Conv3d(3x3x3,
/// pad 1) -> logits [batch, 2, 4, 4, 4]`, its output known exactly from
/// [`conv3d_reference`].
pub fn conv3d_model(batch: Dim) -> ModelProto {
    let mut w = Vec::with_capacity(54);
    for o in 0..2 {
        for z in 0..3 {
            for y in 0..3 {
                for x in 0..3 {
                    w.push(conv3d_weight(o, z, y, x));
                }
            }
        }
    }
    let dims = |c: i64| {
        [
            batch.clone(),
            Dim::Fixed(c),
            Dim::Fixed(4),
            Dim::Fixed(4),
            Dim::Fixed(4),
        ]
    };
    let mut g = GraphBuilder::new("conv3d_1to2");
    let image = g.input("image", &dims(1));
    let wname = g.weight("W", &[2, 1, 3, 3, 3], &w);
    let bname = g.weight("B", &[2], &CONV3D_BIAS);
    g.node(
        "Conv",
        &[&image, &wname, &bname],
        vec![
            ("kernel_shape", Attr::Ints(vec![3, 3, 3])),
            ("pads", Attr::Ints(vec![1, 1, 1, 1, 1, 1])),
            ("strides", Attr::Ints(vec![1, 1, 1])),
        ],
    );
    g.rename_last_output("logits");
    g.output("logits", &dims(2));
    g.finish("infl8 tests")
}

/// [`conv3d_model`] in plain loops: `out[b][o][z][y][x] = bias[o] + sum of
/// w * in` over the 3x3x3 neighbourhood, zero outside.
pub fn conv3d_reference(input: &[f32], batch: usize) -> Vec<f32> {
    let at = |b: usize, z: isize, y: isize, x: isize| -> f32 {
        let inside = |v: isize| (0..4).contains(&v);
        if inside(z) && inside(y) && inside(x) {
            input[b * 64 + (z * 16 + y * 4 + x) as usize]
        } else {
            0.0
        }
    };
    let mut out = Vec::with_capacity(batch * 128);
    for b in 0..batch {
        for (o, bias) in CONV3D_BIAS.iter().enumerate() {
            for z in 0..4isize {
                for y in 0..4isize {
                    for x in 0..4isize {
                        let mut acc = *bias;
                        for kz in 0..3usize {
                            for ky in 0..3usize {
                                for kx in 0..3usize {
                                    let (dz, dy, dx) =
                                        (kz as isize - 1, ky as isize - 1, kx as isize - 1);
                                    acc += conv3d_weight(o, kz, ky, kx)
                                        * at(b, z + dz, y + dy, x + dx);
                                }
                            }
                        }
                        out.push(acc);
                    }
                }
            }
        }
    }
    out
}

/// A deterministic input for [`conv3d_model`]: `batch` windows of 4^3.
pub fn conv3d_input(batch: usize) -> Vec<f32> {
    (0..batch * 64)
        .map(|i| ((i * 7) % 11) as f32 * 0.5 - 2.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn example_model_round_trips_through_protobuf() {
        let m = head_mask_model([32, 32, 32], 0.2, 10.0);
        let bytes = m.encode_to_vec();
        let back = crate::decode(&bytes, std::path::Path::new("mem.onnx")).unwrap();
        assert_eq!(back, m);
        let ins = crate::inputs(&back);
        assert_eq!(ins.len(), 1);
        assert_eq!(ins[0].shape.as_ref().unwrap().len(), 5);
        let attr = &back.graph.unwrap().node[0].attribute[0];
        assert_eq!(attr.r#type, crate::proto::AttributeType::Ints as i32);
    }
}
