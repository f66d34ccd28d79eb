//! Which nodes get quantized, which tensors are observed during
//! calibration, and why the others are left in float.

use std::collections::{HashMap, HashSet};

use infl8_onnx::proto::{GraphProto, ModelProto, NodeProto, data_type};
use serde::Serialize;

use crate::QuantizeError;

/// Op types whose inputs are quantized unless `--op-types` says otherwise:
/// the compute-heavy ones, which ONNX Runtime and TensorRT fuse with their
/// Q/DQ pairs into int8 kernels.
pub const DEFAULT_OP_TYPES: [&str; 4] = ["Conv", "ConvTranspose", "MatMul", "Gemm"];

/// Default exclusions: the first and last quantizable layers (the patch
/// embedding sees raw intensities, the head's logits decide every label),
/// and the numerically delicate normalisations.
pub const DEFAULT_EXCLUDE: [&str; 4] = ["first", "last", "op:Softmax", "op:LayerNormalization"];

/// Op types with per-channel weights (and which weight axis holds the
/// output channels).
fn weight_axis(node: &NodeProto, input: usize, rank: usize) -> Option<usize> {
    match (node.op_type.as_str(), input) {
        ("Conv", 1) => Some(0),
        // [C_in, C_out / group, k...]: output channels on axis 1.
        ("ConvTranspose", 1) => Some(1),
        // B [..., K, N]: one scale per output column.
        ("MatMul", 1) => Some(rank.saturating_sub(1)),
        ("Gemm", 1) => {
            let trans_b = node
                .attribute
                .iter()
                .find(|a| a.name == "transB")
                .is_some_and(|a| a.i != 0);
            Some(if trans_b { 0 } else { 1 })
        }
        _ => None,
    }
}

/// A float initializer quantized to int8.
#[derive(Clone, Debug, Serialize)]
pub struct WeightTarget {
    pub tensor: String,
    pub dims: Vec<i64>,
    /// Per-channel axis, or `None` for one scale (a weight in a slot with
    /// no output-channel axis, e.g. MatMul's A).
    pub axis: Option<usize>,
}

/// A quantized node: its activation inputs get Q/DQ pairs, its weights int8.
#[derive(Clone, Debug, Serialize)]
pub struct NodeTarget {
    pub node: String,
    pub op_type: String,
    /// (input slot, tensor name) of activations.
    pub activations: Vec<(usize, String)>,
    /// (input slot, weight) of initializers.
    pub weights: Vec<(usize, WeightTarget)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Excluded {
    pub node: String,
    pub op_type: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub targets: Vec<NodeTarget>,
    pub excluded: Vec<Excluded>,
    /// Activation tensors to observe, in graph order, each once.
    pub observed: Vec<String>,
}

/// An entry of the exclusion list: `first`, `last`, `op:TYPE` or a node name.
#[derive(Clone, Debug, PartialEq)]
enum Rule {
    First,
    Last,
    Op(String),
    Node(String),
}

fn parse_rule(s: &str) -> Rule {
    match s {
        "first" => Rule::First,
        "last" => Rule::Last,
        _ => match s.strip_prefix("op:") {
            Some(op) => Rule::Op(op.to_string()),
            None => Rule::Node(s.to_string()),
        },
    }
}

pub fn graph(model: &ModelProto) -> Result<&GraphProto, QuantizeError> {
    model
        .graph
        .as_ref()
        .ok_or_else(|| QuantizeError::Model("the model has no graph".into()))
}

/// Node names, made unique and non-empty (ONNX allows empty ones; the
/// report and the exclusion list need a handle for every node).
pub fn node_names(g: &GraphProto) -> Vec<String> {
    let mut seen = HashSet::new();
    g.node
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let base = if n.name.is_empty() {
                format!("{}_{i}", n.op_type)
            } else {
                n.name.clone()
            };
            let mut name = base.clone();
            let mut k = 1;
            while !seen.insert(name.clone()) {
                name = format!("{base}.{k}");
                k += 1;
            }
            name
        })
        .collect()
}

impl Plan {
    pub fn new(
        model: &ModelProto,
        op_types: &[String],
        exclude: &[String],
    ) -> Result<Plan, QuantizeError> {
        let g = graph(model)?;
        let names = node_names(g);
        let inits: HashMap<&str, &infl8_onnx::proto::TensorProto> =
            g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
        // Outputs of Constant nodes are weights too, but rare in exported
        // segmentation models; they stay float (not observed: not variable).
        let constants: HashSet<&str> = g
            .node
            .iter()
            .filter(|n| n.op_type == "Constant")
            .flat_map(|n| n.output.iter().map(String::as_str))
            .collect();
        let rules: Vec<Rule> = exclude.iter().map(|s| parse_rule(s)).collect();
        for r in &rules {
            if let Rule::Node(n) = r
                && !names.iter().any(|m| m == n)
            {
                return Err(QuantizeError::Options(format!(
                    "--exclude {n}: the model has no node of that name (use op:TYPE for an op type, \
                     first or last for the end layers)"
                )));
            }
        }
        let quantizable: Vec<usize> = g
            .node
            .iter()
            .enumerate()
            .filter(|(_, n)| n.domain.is_empty() && op_types.contains(&n.op_type))
            .map(|(i, _)| i)
            .collect();
        let first = quantizable.first().copied();
        let last = quantizable.last().copied();

        let mut targets = Vec::new();
        let mut excluded = Vec::new();
        let mut observed = Vec::new();
        let mut observed_set = HashSet::new();
        for (i, node) in g.node.iter().enumerate() {
            let name = &names[i];
            let reason = rules.iter().find_map(|r| match r {
                Rule::First if Some(i) == first => {
                    Some("first quantizable layer (--exclude first)")
                }
                Rule::Last if Some(i) == last => Some("last quantizable layer (--exclude last)"),
                Rule::Op(op) if *op == node.op_type => Some("op type excluded"),
                Rule::Node(n) if n == name => Some("named in --exclude"),
                _ => None,
            });
            if let Some(reason) = reason {
                excluded.push(Excluded {
                    node: name.clone(),
                    op_type: node.op_type.clone(),
                    reason: reason.into(),
                });
                continue;
            }
            if !quantizable.contains(&i) {
                continue;
            }
            let mut t = NodeTarget {
                node: name.clone(),
                op_type: node.op_type.clone(),
                activations: vec![],
                weights: vec![],
            };
            for (slot, input) in node.input.iter().enumerate() {
                if input.is_empty() || constants.contains(input.as_str()) {
                    continue;
                }
                // Biases stay float: runtimes fold them in at int32 or f32.
                let is_bias =
                    matches!(node.op_type.as_str(), "Conv" | "ConvTranspose" | "Gemm") && slot == 2;
                if is_bias {
                    continue;
                }
                if let Some(init) = inits.get(input.as_str()) {
                    if init.data_type != data_type::FLOAT {
                        continue;
                    }
                    let axis =
                        weight_axis(node, slot, init.dims.len()).filter(|&a| a < init.dims.len());
                    t.weights.push((
                        slot,
                        WeightTarget {
                            tensor: input.clone(),
                            dims: init.dims.clone(),
                            axis,
                        },
                    ));
                } else {
                    t.activations.push((slot, input.clone()));
                    if observed_set.insert(input.clone()) {
                        observed.push(input.clone());
                    }
                }
            }
            targets.push(t);
        }
        Ok(Plan {
            targets,
            excluded,
            observed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infl8_onnx::builder::{Dim, GraphBuilder};

    /// input -> Conv -> MatMul(w) -> Softmax -> MatMul(act, act) -> Conv
    fn model() -> ModelProto {
        let mut b = GraphBuilder::new("t");
        let x = b.input(
            "x",
            &[Dim::Fixed(1), Dim::Fixed(1), Dim::Fixed(4), Dim::Fixed(4)],
        );
        let w0 = b.weight("w0", &[2, 1, 1, 1], &[1.0, 2.0]);
        let c0 = b.node("Conv", &[&x, &w0], vec![]);
        let w1 = b.weight("w1", &[4, 4], &[0.5; 16]);
        let m1 = b.node("MatMul", &[&c0, &w1], vec![]);
        let s = b.node("Softmax", &[&m1], vec![]);
        let m2 = b.node("MatMul", &[&s, &m1], vec![]);
        let w3 = b.weight("w3", &[1, 2, 1, 1], &[1.0, 1.0]);
        b.node("Conv", &[&m2, &w3], vec![]);
        b.rename_last_output("y");
        b.output(
            "y",
            &[Dim::Fixed(1), Dim::Fixed(1), Dim::Fixed(4), Dim::Fixed(4)],
        );
        b.finish("test")
    }

    fn ops(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn default_plan_skips_the_end_layers() {
        let m = model();
        let p = Plan::new(&m, &ops(&DEFAULT_OP_TYPES), &ops(&DEFAULT_EXCLUDE)).unwrap();
        let names: Vec<&str> = p.targets.iter().map(|t| t.op_type.as_str()).collect();
        assert_eq!(names, ["MatMul", "MatMul"]);
        // The weight MatMul: one activation, one per-column weight.
        assert_eq!(p.targets[0].activations.len(), 1);
        assert_eq!(p.targets[0].weights[0].1.axis, Some(1));
        // The attention-like MatMul: two activations, no weight.
        assert_eq!(p.targets[1].activations.len(), 2);
        assert!(p.targets[1].weights.is_empty());
        // Conv output feeds the first MatMul; m1 is observed once although
        // two quantized slots read it.
        assert_eq!(p.observed.len(), 3);
        let reasons: Vec<&str> = p.excluded.iter().map(|e| e.op_type.as_str()).collect();
        assert_eq!(reasons, ["Conv", "Softmax", "Conv"]);
    }

    #[test]
    fn nothing_excluded_quantizes_every_conv() {
        let m = model();
        let p = Plan::new(&m, &ops(&DEFAULT_OP_TYPES), &[]).unwrap();
        assert_eq!(p.targets.len(), 4);
        assert_eq!(p.targets[0].weights[0].1.axis, Some(0));
        assert!(p.observed.contains(&"x".to_string()));
    }

    #[test]
    fn an_unknown_node_name_is_refused() {
        let m = model();
        let err = Plan::new(&m, &ops(&DEFAULT_OP_TYPES), &ops(&["nope"])).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
