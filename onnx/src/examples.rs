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
