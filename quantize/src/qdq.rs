//! The graph rewrite: int8 weights behind DequantizeLinear, Q/DQ pairs on
//! the activations quantized nodes read.
//!
//! Every scale is symmetric (zero point 0) and the int8 range is the
//! restricted -127..=127, so TensorRT's explicit quantization accepts the
//! model as is; ONNX Runtime fuses the same pairs into its int8 kernels and
//! tract runs them as written.

use std::collections::{HashMap, HashSet};

use infl8_onnx::builder::f32_tensor;
use infl8_onnx::proto::{
    AttributeProto, AttributeType, ModelProto, NodeProto, TensorProto, data_type,
};
use serde::Serialize;

use crate::QuantizeError;
use crate::calibrate::LEVELS;
use crate::plan::{Plan, graph, node_names};

/// What quantizing one weight tensor cost.
#[derive(Clone, Debug, Serialize)]
pub struct WeightReport {
    pub tensor: String,
    pub nodes: Vec<String>,
    pub op_type: String,
    pub axis: Option<usize>,
    pub channels: usize,
    /// Largest |w| of the tensor.
    pub amax: f32,
    pub sqnr_db: Option<f64>,
}

/// The oldest opset with per-axis QuantizeLinear/DequantizeLinear.
const MIN_OPSET: i64 = 13;

pub fn f32_values(t: &TensorProto) -> Result<Vec<f32>, QuantizeError> {
    if t.data_location == 1 || !t.external_data.is_empty() {
        return Err(QuantizeError::Model(format!(
            "initializer {} keeps its data in an external file; save the model with \
             its weights inside it",
            t.name
        )));
    }
    let n: i64 = t.dims.iter().product();
    let n = usize::try_from(n).map_err(|_| {
        QuantizeError::Model(format!("initializer {} has dims {:?}", t.name, t.dims))
    })?;
    let values: Vec<f32> = if !t.raw_data.is_empty() {
        t.raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    } else {
        t.float_data.clone()
    };
    if values.len() != n {
        return Err(QuantizeError::Model(format!(
            "initializer {} holds {} values, its dims {:?} need {n}",
            t.name,
            values.len(),
            t.dims
        )));
    }
    Ok(values)
}

fn i8_tensor(name: &str, dims: &[i64], data: &[i8]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: data_type::INT8,
        raw_data: data.iter().map(|&v| v as u8).collect(),
        ..Default::default()
    }
}

/// Per-channel symmetric int8 quantization of `w` along `axis` (one scale
/// for the whole tensor when `axis` is `None`). Returns the int8 values,
/// the scales and the SQNR of the round trip.
pub fn quantize_weight(
    w: &[f32],
    dims: &[i64],
    axis: Option<usize>,
) -> (Vec<i8>, Vec<f32>, Option<f64>) {
    let (channels, inner) = match axis {
        Some(a) => (
            dims[a].max(1) as usize,
            dims[a + 1..].iter().product::<i64>().max(1) as usize,
        ),
        None => (1, w.len().max(1)),
    };
    let channel = |i: usize| (i / inner) % channels;
    let mut amax = vec![0f32; channels];
    for (i, &v) in w.iter().enumerate() {
        let c = channel(i);
        amax[c] = amax[c].max(v.abs());
    }
    // An all-zero channel quantizes to zeros under any positive scale; 1
    // keeps runtimes that divide by the scale away from infinities.
    let scales: Vec<f32> = amax
        .iter()
        .map(|&m| if m > 0.0 { m / LEVELS as f32 } else { 1.0 })
        .collect();
    let (mut signal, mut noise) = (0f64, 0f64);
    let q: Vec<i8> = w
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let s = scales[channel(i)];
            let q = (v / s)
                .round_ties_even()
                .clamp(-(LEVELS as f32), LEVELS as f32);
            let back = q * s;
            signal += (v as f64).powi(2);
            noise += ((v - back) as f64).powi(2);
            q as i8
        })
        .collect();
    let sqnr = (signal > 0.0).then(|| 10.0 * (signal / noise.max(f64::MIN_POSITIVE)).log10());
    (q, scales, sqnr)
}

fn node(
    op: &str,
    name: String,
    inputs: Vec<String>,
    output: String,
    axis: Option<i64>,
) -> NodeProto {
    let attribute = axis
        .map(|a| {
            vec![AttributeProto {
                name: "axis".into(),
                i: a,
                r#type: AttributeType::Int as i32,
                ..Default::default()
            }]
        })
        .unwrap_or_default();
    NodeProto {
        input: inputs,
        output: vec![output],
        name,
        op_type: op.into(),
        attribute,
        ..Default::default()
    }
}

/// Names not yet used in the graph.
struct Names(HashSet<String>);

impl Names {
    fn fresh(&mut self, base: String) -> String {
        let mut name = base.clone();
        let mut k = 1;
        while !self.0.insert(name.clone()) {
            name = format!("{base}.{k}");
            k += 1;
        }
        name
    }
}

/// Rewrites `model` to QDQ form. `thresholds` maps each observed
/// activation to its clipping threshold; one at 0 (the tensor was all
/// zeros) leaves that activation float.
pub fn rewrite(
    model: &ModelProto,
    plan: &Plan,
    thresholds: &HashMap<String, f32>,
) -> Result<(ModelProto, Vec<WeightReport>), QuantizeError> {
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(0);
    if opset < MIN_OPSET {
        return Err(QuantizeError::Model(format!(
            "the model uses ONNX opset {opset}; per-channel QuantizeLinear/DequantizeLinear \
             need opset {MIN_OPSET} or newer (re-export the model with a newer opset)"
        )));
    }
    let g = graph(model)?;
    let names = node_names(g);
    let mut used = Names(
        g.node
            .iter()
            .flat_map(|n| n.output.iter().cloned())
            .chain(g.initializer.iter().map(|t| t.name.clone()))
            .chain(g.input.iter().map(|v| v.name.clone()))
            .chain(names.iter().cloned())
            .collect(),
    );

    // Activations: one Q/DQ pair per tensor, shared by its quantized readers.
    let mut act_dq: HashMap<String, String> = HashMap::new();
    let mut act_nodes: HashMap<String, [NodeProto; 2]> = HashMap::new();
    let mut new_inits: Vec<TensorProto> = Vec::new();
    for t in &plan.observed {
        let th = thresholds.get(t).copied().unwrap_or(0.0);
        if th <= 0.0 || !th.is_finite() {
            continue;
        }
        let scale = used.fresh(format!("{t}_scale"));
        let zp = used.fresh(format!("{t}_zero_point"));
        let q = used.fresh(format!("{t}_quantized"));
        let dq = used.fresh(format!("{t}_dequantized"));
        new_inits.push(f32_tensor(&scale, &[], &[th / LEVELS as f32]));
        new_inits.push(i8_tensor(&zp, &[], &[0]));
        let qn = node(
            "QuantizeLinear",
            used.fresh(format!("{t}_QuantizeLinear")),
            vec![t.clone(), scale.clone(), zp.clone()],
            q.clone(),
            None,
        );
        let dqn = node(
            "DequantizeLinear",
            used.fresh(format!("{t}_DequantizeLinear")),
            vec![q, scale, zp],
            dq.clone(),
            None,
        );
        act_dq.insert(t.clone(), dq);
        act_nodes.insert(t.clone(), [qn, dqn]);
    }

    // Weights: int8 initializer + scales + DequantizeLinear, keyed by
    // (tensor, axis) so a weight shared by two nodes is stored once.
    let inits: HashMap<&str, &TensorProto> =
        g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut weight_dq: HashMap<(String, Option<usize>), String> = HashMap::new();
    let mut weight_nodes: Vec<NodeProto> = Vec::new();
    let mut reports: Vec<WeightReport> = Vec::new();
    let mut rewired: HashMap<String, HashMap<usize, String>> = HashMap::new();
    for t in &plan.targets {
        let slots = rewired.entry(t.node.clone()).or_default();
        for (slot, w) in &t.weights {
            let key = (w.tensor.clone(), w.axis);
            if let Some(dq) = weight_dq.get(&key) {
                slots.insert(*slot, dq.clone());
                if let Some(r) = reports
                    .iter_mut()
                    .find(|r| r.tensor == w.tensor && r.axis == w.axis)
                {
                    r.nodes.push(t.node.clone());
                }
                continue;
            }
            let init = inits.get(w.tensor.as_str()).ok_or_else(|| {
                QuantizeError::Model(format!("initializer {} disappeared", w.tensor))
            })?;
            let values = f32_values(init)?;
            let (q, scales, sqnr) = quantize_weight(&values, &init.dims, w.axis);
            let qname = used.fresh(format!("{}_quantized", w.tensor));
            let sname = used.fresh(format!("{}_scale", w.tensor));
            let zname = used.fresh(format!("{}_zero_point", w.tensor));
            let dq = used.fresh(format!("{}_dequantized", w.tensor));
            let scale_dims: Vec<i64> = match w.axis {
                Some(_) => vec![scales.len() as i64],
                None => vec![],
            };
            new_inits.push(i8_tensor(&qname, &init.dims, &q));
            new_inits.push(f32_tensor(&sname, &scale_dims, &scales));
            new_inits.push(i8_tensor(&zname, &scale_dims, &vec![0; scales.len()]));
            weight_nodes.push(node(
                "DequantizeLinear",
                used.fresh(format!("{}_DequantizeLinear", w.tensor)),
                vec![qname, sname, zname],
                dq.clone(),
                w.axis.map(|a| a as i64),
            ));
            reports.push(WeightReport {
                tensor: w.tensor.clone(),
                nodes: vec![t.node.clone()],
                op_type: t.op_type.clone(),
                axis: w.axis,
                channels: scales.len(),
                amax: values.iter().fold(0f32, |m, v| m.max(v.abs())),
                sqnr_db: sqnr,
            });
            weight_dq.insert(key, dq.clone());
            slots.insert(*slot, dq);
        }
        for (slot, a) in &t.activations {
            if let Some(dq) = act_dq.get(a) {
                slots.insert(*slot, dq.clone());
            }
        }
    }

    // Node order stays topological: weight DQs and graph-input pairs
    // first, every other pair right after the node producing its tensor.
    let mut nodes: Vec<NodeProto> = weight_nodes;
    let graph_inputs: Vec<&String> = g.input.iter().map(|v| &v.name).collect();
    for name in graph_inputs {
        if let Some(pair) = act_nodes.remove(name) {
            nodes.extend(pair);
        }
    }
    for (i, n) in g.node.iter().enumerate() {
        let mut n = n.clone();
        if let Some(slots) = rewired.get(&names[i]) {
            for (&slot, to) in slots {
                n.input[slot] = to.clone();
            }
        }
        let outputs = n.output.clone();
        nodes.push(n);
        for o in &outputs {
            if let Some(pair) = act_nodes.remove(o) {
                nodes.extend(pair);
            }
        }
    }
    if let Some(t) = act_nodes.keys().next() {
        return Err(QuantizeError::Model(format!(
            "activation {t} is neither a graph input nor a node output"
        )));
    }

    // Float weights nobody reads any more are dropped: that is where the
    // 4x smaller file comes from.
    let still_read: HashSet<&str> = nodes
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .chain(g.output.iter().map(|o| o.name.as_str()))
        .collect();
    let mut initializer: Vec<TensorProto> = g
        .initializer
        .iter()
        .filter(|t| still_read.contains(t.name.as_str()))
        .cloned()
        .collect();
    initializer.extend(new_inits);
    let mut out = model.clone();
    if let Some(og) = out.graph.as_mut() {
        og.node = nodes;
        og.initializer = initializer;
        // Older exporters list initializers as graph inputs too: drop those
        // that were removed.
        let kept: HashSet<String> = og.initializer.iter().map(|t| t.name.clone()).collect();
        let removed: HashSet<&str> = g
            .initializer
            .iter()
            .map(|t| t.name.as_str())
            .filter(|n| !kept.contains(*n))
            .collect();
        og.input.retain(|v| !removed.contains(v.name.as_str()));
    }
    Ok((out, reports))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_channel_scales_follow_each_channel() {
        // Two output channels of very different magnitude: per-channel
        // scales keep the small one precise.
        let w = [1.0, -0.5, 0.25, 100.0, -50.0, 25.0];
        let (q, s, sqnr) = quantize_weight(&w, &[2, 3], Some(0));
        assert_eq!(s, vec![1.0 / 127.0, 100.0 / 127.0]);
        assert_eq!(q, vec![127, -64, 32, 127, -64, 32]);
        assert!(sqnr.unwrap() > 40.0);
        // One scale for all: the small channel mostly rounds away.
        let (_, s1, sqnr1) = quantize_weight(&w, &[2, 3], None);
        assert_eq!(s1.len(), 1);
        assert!(sqnr1.unwrap() < sqnr.unwrap());
    }

    #[test]
    fn axis_one_groups_columns() {
        // [K=2, N=3]: column j is w[0][j], w[1][j].
        let w = [1.0, 10.0, 100.0, -1.0, -10.0, -100.0];
        let (q, s, _) = quantize_weight(&w, &[2, 3], Some(1));
        assert_eq!(s.len(), 3);
        assert_eq!(q, vec![127, 127, 127, -127, -127, -127]);
    }

    #[test]
    fn zero_channel_gets_a_harmless_scale() {
        let (q, s, _) = quantize_weight(&[0.0, 0.0, 2.0, 1.0], &[2, 2], Some(0));
        assert_eq!(s[0], 1.0);
        assert_eq!(&q[..2], &[0, 0]);
    }
}
