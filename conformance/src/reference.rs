//! The kit's own numbers for its reference model: a plain-loop evaluator of
//! ONNX graphs made of 3D `Conv` (and `Relu`) nodes, written independently
//! of every backend. The "vs reference" checks compare a plugin with this,
//! so no backend is ever checked against itself (tract against tract).
//!
//! It reads the weights from the same `ModelProto` the plugin loads, and
//! accumulates in f64: for the 16³ reference model it is exact to well
//! below the kit's tolerance.

use std::collections::HashMap;

use infl8_onnx::ModelProto;
use infl8_onnx::proto::{AttributeProto, TensorProto, data_type};

/// A dense f32 tensor in C order.
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Why a model cannot be evaluated here.
#[derive(Debug, thiserror::Error)]
#[error("reference evaluator: {0}")]
pub struct ReferenceError(String);

fn fail<T>(message: impl Into<String>) -> Result<T, ReferenceError> {
    Err(ReferenceError(message.into()))
}

/// Runs `model` on `input` (its one graph input) and returns its one output.
pub fn evaluate(model: &ModelProto, input: Dense) -> Result<Dense, ReferenceError> {
    let Some(graph) = &model.graph else {
        return fail("the model has no graph");
    };
    let (Some(graph_in), [graph_out]) = (graph.input.first(), graph.output.as_slice()) else {
        return fail("the graph needs one input and one output");
    };
    let mut values: HashMap<&str, Dense> = HashMap::new();
    for t in &graph.initializer {
        values.insert(&t.name, initializer(t)?);
    }
    values.insert(&graph_in.name, input);
    for node in &graph.node {
        let arg = |i: usize| -> Result<&Dense, ReferenceError> {
            let name = node.input.get(i).map(String::as_str).unwrap_or_default();
            values.get(name).ok_or_else(|| {
                ReferenceError(format!(
                    "{} `{}`: no value `{name}`",
                    node.op_type, node.name
                ))
            })
        };
        let out = match node.op_type.as_str() {
            "Conv" => {
                let bias = if node.input.len() > 2 {
                    Some(arg(2)?)
                } else {
                    None
                };
                conv3d(arg(0)?, arg(1)?, bias, &node.attribute)?
            }
            "Relu" => {
                let x = arg(0)?;
                Dense {
                    shape: x.shape.clone(),
                    data: x.data.iter().map(|v| v.max(0.0)).collect(),
                }
            }
            op => return fail(format!("unsupported operator {op}")),
        };
        let Some(name) = node.output.first() else {
            return fail(format!("{} `{}` has no output", node.op_type, node.name));
        };
        values.insert(name, out);
    }
    values
        .remove(graph_out.name.as_str())
        .ok_or_else(|| ReferenceError(format!("nothing computes the output `{}`", graph_out.name)))
}

fn initializer(t: &TensorProto) -> Result<Dense, ReferenceError> {
    if t.data_type != data_type::FLOAT {
        return fail(format!("initializer {} is not f32", t.name));
    }
    let shape = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| ReferenceError(format!("initializer {} has dims {:?}", t.name, t.dims)))?;
    let data: Vec<f32> = if t.raw_data.is_empty() {
        t.float_data.clone()
    } else {
        t.raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    if data.len() != shape.iter().product::<usize>() {
        return fail(format!(
            "initializer {} holds {} values for dims {shape:?}",
            t.name,
            data.len()
        ));
    }
    Ok(Dense { shape, data })
}

/// An ints attribute, or `default` for each of `n` axes.
fn ints(attrs: &[AttributeProto], name: &str, n: usize, default: i64) -> Vec<i64> {
    attrs
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.ints.clone())
        .unwrap_or_else(|| vec![default; n])
}

/// ONNX `Conv` on `[N, C, X, Y, Z]` with weights `[O, C, KX, KY, KZ]`: any
/// pads, strides and dilations; one group; explicit padding only.
fn conv3d(
    x: &Dense,
    w: &Dense,
    bias: Option<&Dense>,
    attrs: &[AttributeProto],
) -> Result<Dense, ReferenceError> {
    let (&[n, c, sx, sy, sz], &[o, wc, kx, ky, kz]) = (x.shape.as_slice(), w.shape.as_slice())
    else {
        return fail(format!(
            "Conv takes 5-D input and weights, got {:?} and {:?}",
            x.shape, w.shape
        ));
    };
    let group = attrs.iter().find(|a| a.name == "group").map_or(1, |a| a.i);
    let auto_pad = attrs.iter().find(|a| a.name == "auto_pad");
    if group != 1 || wc != c || auto_pad.is_some_and(|a| !a.s.is_empty() && a.s != b"NOTSET") {
        return fail("Conv: only group 1 with explicit pads");
    }
    let pads = ints(attrs, "pads", 6, 0);
    let strides = ints(attrs, "strides", 3, 1);
    let dilations = ints(attrs, "dilations", 3, 1);
    let as_usize = |v: &[i64], len: usize, what: &str| -> Result<Vec<usize>, ReferenceError> {
        let u: Option<Vec<usize>> = v.iter().map(|&i| usize::try_from(i).ok()).collect();
        u.filter(|u| u.len() == len)
            .ok_or_else(|| ReferenceError(format!("Conv {what} {v:?}")))
    };
    let (pads, strides, dil) = (
        as_usize(&pads, 6, "pads")?,
        as_usize(&strides, 3, "strides")?,
        as_usize(&dilations, 3, "dilations")?,
    );
    if strides.contains(&0) || dil.contains(&0) {
        return fail("Conv strides and dilations must be positive");
    }
    let size = [sx, sy, sz];
    let kernel = [kx, ky, kz];
    let mut out_size = [0usize; 3];
    for a in 0..3 {
        let span = (kernel[a] - 1) * dil[a] + 1;
        let padded = size[a] + pads[a] + pads[a + 3];
        if padded < span {
            return fail("Conv kernel larger than the padded input");
        }
        out_size[a] = (padded - span) / strides[a] + 1;
    }
    if let Some(b) = bias
        && b.data.len() != o
    {
        return fail(format!(
            "Conv bias holds {} values for {o} outputs",
            b.data.len()
        ));
    }
    let [ox, oy, oz] = out_size;
    let mut data = Vec::with_capacity(n * o * ox * oy * oz);
    // Input index along one axis, if the tap lands inside the image.
    let tap = |a: usize, out: usize, k: usize| -> Option<usize> {
        (out * strides[a] + k * dil[a])
            .checked_sub(pads[a])
            .filter(|&i| i < size[a])
    };
    for b in 0..n {
        for oc in 0..o {
            for i in 0..ox {
                for j in 0..oy {
                    for l in 0..oz {
                        let mut acc = bias.map_or(0.0, |bv| f64::from(bv.data[oc]));
                        for ic in 0..c {
                            let xin = &x.data[(b * c + ic) * sx * sy * sz..];
                            let win = &w.data[(oc * c + ic) * kx * ky * kz..];
                            for (p, q, r) in (0..kx).flat_map(|p| {
                                (0..ky).flat_map(move |q| (0..kz).map(move |r| (p, q, r)))
                            }) {
                                if let (Some(u), Some(v), Some(t)) =
                                    (tap(0, i, p), tap(1, j, q), tap(2, l, r))
                                {
                                    acc += f64::from(win[(p * ky + q) * kz + r])
                                        * f64::from(xin[(u * sy + v) * sz + t]);
                                }
                            }
                        }
                        data.push(acc as f32);
                    }
                }
            }
        }
    }
    Ok(Dense {
        shape: vec![n, o, ox, oy, oz],
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use infl8_onnx::examples;

    #[test]
    fn head_mask_model_is_gain_times_local_mean_minus_threshold() {
        // The example model's definition: channel 1 = gain * (mean3x3x3(x)
        // - threshold), zero padding, channel 0 its negative.
        let (n, threshold, gain) = (5usize, 0.5f32, 8.0f32);
        let model = examples::head_mask_model([n as i64; 3], threshold, gain);
        let x = examples::pseudo_random(2 * n * n * n, 3, 0.0, 1.0);
        let out = evaluate(
            &model,
            Dense {
                shape: vec![2, 1, n, n, n],
                data: x.clone(),
            },
        )
        .unwrap();
        assert_eq!(out.shape, [2, 2, n, n, n]);
        let at = |b: usize, i: isize, j: isize, k: isize| -> f32 {
            let ok = |v: isize| (0..n as isize).contains(&v);
            if ok(i) && ok(j) && ok(k) {
                x[b * n * n * n + (i as usize * n + j as usize) * n + k as usize]
            } else {
                0.0
            }
        };
        let mut worst = 0f32;
        for b in 0..2 {
            for i in 0..n as isize {
                for j in 0..n as isize {
                    for k in 0..n as isize {
                        let mut sum = 0.0;
                        for d in [-1, 0, 1] {
                            for e in [-1, 0, 1] {
                                for f in [-1, 0, 1] {
                                    sum += at(b, i + d, j + e, k + f);
                                }
                            }
                        }
                        let want = gain * (sum / 27.0 - threshold);
                        let idx = |ch: usize| {
                            ((b * 2 + ch) * n + i as usize) * n * n + j as usize * n + k as usize
                        };
                        worst = worst.max((out.data[idx(1)] - want).abs());
                        worst = worst.max((out.data[idx(0)] + want).abs());
                    }
                }
            }
        }
        assert!(worst < 1e-5, "max |diff| {worst}");
    }

    #[test]
    fn strides_dilations_and_asymmetric_pads_follow_onnx() {
        // 1-channel 1x1x4 input, kernel [1, 1, 2] of ones, dilation 2,
        // pads end 1 on z, stride 2: out[z] = x[2z] + x[2z + 2].
        let mut g = infl8_onnx::GraphBuilder::new("t");
        use infl8_onnx::builder::{Attr, Dim};
        let x = g.input(
            "x",
            &[
                Dim::Fixed(1),
                Dim::Fixed(1),
                Dim::Fixed(1),
                Dim::Fixed(1),
                Dim::Fixed(4),
            ],
        );
        let w = g.weight("w", &[1, 1, 1, 1, 2], &[1.0, 1.0]);
        g.node_named(
            "Conv",
            "c",
            &[&x, &w],
            &["y"],
            vec![
                ("pads", Attr::Ints(vec![0, 0, 0, 0, 0, 1])),
                ("strides", Attr::Ints(vec![1, 1, 2])),
                ("dilations", Attr::Ints(vec![1, 1, 2])),
            ],
        );
        g.output(
            "y",
            &[
                Dim::Fixed(1),
                Dim::Fixed(1),
                Dim::Fixed(1),
                Dim::Fixed(1),
                Dim::Fixed(2),
            ],
        );
        let model = g.finish("t");
        let out = evaluate(
            &model,
            Dense {
                shape: vec![1, 1, 1, 1, 4],
                data: vec![1.0, 10.0, 100.0, 1000.0],
            },
        )
        .unwrap();
        assert_eq!(out.shape, [1, 1, 1, 1, 2]);
        assert_eq!(out.data, [101.0, 100.0]);
    }

    #[test]
    fn unknown_operators_are_refused() {
        let model = examples::pointwise_model(&[1.0], &[0.0], 1);
        let mut model = model;
        if let Some(g) = model.graph.as_mut() {
            g.node[0].op_type = "Softmax".into();
        }
        let e = evaluate(
            &model,
            Dense {
                shape: vec![1, 1, 1, 1, 1],
                data: vec![1.0],
            },
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("unsupported operator Softmax"),
            "{e}"
        );
    }
}
