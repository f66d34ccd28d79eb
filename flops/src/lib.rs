//! FLOPs of an ONNX model for one concrete input shape.
//!
//! tract infers every tensor's shape from the input shape; the ONNX graph
//! itself gives each node's op type and attributes. Counted are the ops that
//! dominate a segmentation network's cost, at 2 FLOPs per multiply-add:
//!
//! - `Conv`: `2 * N * Cout * prod(out_spatial) * (Cin / group) * prod(kernel)`
//! - `ConvTranspose`: `2 * N * Cin * prod(in_spatial) * (Cout / group) * prod(kernel)`
//! - `MatMul`: `2 * prod(out batch dims) * M * N * K` (numpy broadcasting)
//! - `Gemm`: `2 * M * N * K`
//! - the integer forms `QLinearConv`, `ConvInteger`, `QLinearMatMul` and
//!   `MatMulInteger`, with the same formulas, under their own names.
//!
//! Not counted: element-wise ops (activations, additions, normalisation,
//! softmax, bias terms), pooling, resizing, data movement, and nodes inside
//! subgraphs (`If`, `Loop`, `Scan`). A QDQ model (`QuantizeLinear` /
//! `DequantizeLinear` pairs around float `Conv` / `MatMul`, int8 weights
//! behind a `DequantizeLinear`) counts exactly as its float original: the
//! Q/DQ nodes are element-wise, and a `Conv` counts whatever feeds it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use infl8_onnx::proto::{AttributeProto, ModelProto, NodeProto};
use tract_onnx::prelude::{
    Datum, Framework, InferenceFact, InferenceModel, InferenceModelExt, OutletId, TDim, TVec,
};

/// FLOPs of one model run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Flops {
    pub total: u64,
    /// FLOPs per ONNX op type (only the counted types appear).
    pub by_op: BTreeMap<String, u64>,
}

impl Flops {
    pub fn gflop(&self) -> f64 {
        self.total as f64 / 1e9
    }

    fn add(&mut self, op: &str, flops: u64) -> Option<()> {
        self.total = self.total.checked_add(flops)?;
        let e = self.by_op.entry(op.to_owned()).or_default();
        *e = e.checked_add(flops)?;
        Some(())
    }
}

/// `12.34 GFLOP (Conv 1.23, MatMul 11.11)`.
impl fmt::Display for Flops {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2} GFLOP", self.gflop())?;
        if self.by_op.is_empty() {
            return write!(f, " (no Conv, ConvTranspose, MatMul or Gemm)");
        }
        let parts: Vec<String> = self
            .by_op
            .iter()
            .map(|(op, n)| format!("{op} {:.2}", *n as f64 / 1e9))
            .collect();
        write!(f, " ({})", parts.join(", "))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FlopsError {
    #[error(transparent)]
    Onnx(#[from] infl8_onnx::OnnxError),
    #[error("tract cannot read {model}: {message}")]
    Load { model: String, message: String },
    #[error("{model}: cannot use input shape {shape:?}: {message}")]
    Input {
        model: String,
        shape: Vec<usize>,
        message: String,
    },
    #[error(
        "node {node} ({op}): the shape of `{tensor}` is unknown for input shape {input:?}{why}"
    )]
    UnknownShape {
        node: String,
        op: String,
        tensor: String,
        input: Vec<usize>,
        /// What stopped tract's shape analysis, if it stopped.
        why: String,
    },
    #[error("node {node} ({op}): {message}")]
    Node {
        node: String,
        op: String,
        message: String,
    },
}

/// FLOPs of the model at `path` run on one f32 input of shape `input_shape`.
pub fn model_flops(path: &Path, input_shape: &[usize]) -> Result<Flops, FlopsError> {
    let label = path.display().to_string();
    let proto = infl8_onnx::read_model(path)?;
    // model_for_path (not the bytes already read) so that weights stored as
    // external data next to the model resolve.
    let tract = onnx()
        .model_for_path(path)
        .map_err(|e| load_error(&label, e))?;
    count(&proto, tract, input_shape, &label)
}

/// As [`model_flops`], for a model held in memory.
pub fn model_flops_from_bytes(bytes: &[u8], input_shape: &[usize]) -> Result<Flops, FlopsError> {
    let label = "<in-memory model>".to_owned();
    let proto = infl8_onnx::decode(bytes, Path::new(&label))?;
    let tract = onnx()
        .model_for_read(&mut &bytes[..])
        .map_err(|e| load_error(&label, e))?;
    count(&proto, tract, input_shape, &label)
}

fn onnx() -> tract_onnx::Onnx {
    // value_info may pin shapes to the export's own (often symbolic) sizes,
    // which would contradict the concrete input shape given here.
    tract_onnx::onnx().with_ignore_value_info(true)
}

fn load_error(model: &str, e: tract_onnx::prelude::TractError) -> FlopsError {
    FlopsError::Load {
        model: model.to_owned(),
        message: format!("{e:#}"),
    }
}

fn count(
    proto: &ModelProto,
    mut tract: InferenceModel,
    input_shape: &[usize],
    label: &str,
) -> Result<Flops, FlopsError> {
    let input_error = |message: String| FlopsError::Input {
        model: label.to_owned(),
        shape: input_shape.to_vec(),
        message,
    };
    let declared = infl8_onnx::inputs(proto);
    if declared.len() != 1 || tract.inputs.len() != 1 {
        return Err(input_error(format!(
            "FLOPs are counted for single-input models, this one has {} inputs",
            declared.len()
        )));
    }
    if let Some(dims) = &declared[0].shape
        && dims.len() != input_shape.len()
    {
        return Err(input_error(format!(
            "the model's input `{}` has rank {}",
            declared[0].name,
            dims.len()
        )));
    }
    let dims: TVec<TDim> = input_shape.iter().map(|&d| TDim::Val(d as i64)).collect();
    tract
        .set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), dims))
        .map_err(|e| input_error(format!("{e:#}")))?;
    // Obstinate: one op tract cannot analyse should not hide the shapes it
    // can; a counted node whose shapes stay unknown reports this error.
    let why = match tract.analyse(true) {
        Ok(_) => String::new(),
        Err(e) => format!(" (tract's shape analysis failed: {e:#})"),
    };
    let graph = proto.graph.as_ref().ok_or_else(|| FlopsError::Load {
        model: label.to_owned(),
        message: "the file has no graph".into(),
    })?;
    let shapes = Shapes::new(proto, &tract);
    let mut flops = Flops::default();
    for (index, node) in graph.node.iter().enumerate() {
        let ctx = NodeCtx {
            node,
            index,
            shapes: &shapes,
            input: input_shape,
            why: &why,
        };
        let Some(n) = ctx.flops()? else { continue };
        flops
            .add(&node.op_type, n)
            .ok_or_else(|| ctx.error("the FLOP count overflows 64 bits".into()))?;
    }
    Ok(flops)
}

/// Concrete tensor shapes by ONNX tensor name.
struct Shapes<'a> {
    initializers: HashMap<&'a str, &'a [i64]>,
    tract: &'a InferenceModel,
    /// tract labels each node's outlets with the ONNX output names; graph
    /// inputs are source nodes named after the input.
    outlets: HashMap<&'a str, OutletId>,
}

impl<'a> Shapes<'a> {
    fn new(proto: &'a ModelProto, tract: &'a InferenceModel) -> Self {
        let initializers = proto
            .graph
            .iter()
            .flat_map(|g| &g.initializer)
            .map(|t| (t.name.as_str(), t.dims.as_slice()))
            .collect();
        let mut outlets: HashMap<&str, OutletId> = tract
            .outlet_labels
            .iter()
            .map(|(o, l)| (l.as_str(), *o))
            .collect();
        for &o in &tract.inputs {
            outlets.entry(tract.node(o.node).name.as_str()).or_insert(o);
        }
        Shapes {
            initializers,
            tract,
            outlets,
        }
    }

    fn get(&self, tensor: &str) -> Option<Vec<usize>> {
        if let Some(dims) = self.initializers.get(tensor) {
            return dims.iter().map(|&d| usize::try_from(d).ok()).collect();
        }
        let fact = self.tract.outlet_fact(*self.outlets.get(tensor)?).ok()?;
        fact.shape
            .as_concrete_finite()
            .ok()
            .flatten()
            .map(|s| s.to_vec())
    }
}

struct NodeCtx<'a> {
    node: &'a NodeProto,
    index: usize,
    shapes: &'a Shapes<'a>,
    input: &'a [usize],
    why: &'a str,
}

/// Where a Conv-like op finds its data and weight.
struct ConvInputs {
    x: usize,
    w: usize,
    transpose: bool,
}

impl NodeCtx<'_> {
    fn name(&self) -> String {
        match (&self.node.name, self.node.output.first()) {
            (n, _) if !n.is_empty() => format!("`{n}`"),
            (_, Some(out)) => format!("#{} (output `{out}`)", self.index),
            _ => format!("#{}", self.index),
        }
    }

    fn error(&self, message: String) -> FlopsError {
        FlopsError::Node {
            node: self.name(),
            op: self.node.op_type.clone(),
            message,
        }
    }

    fn flops(&self) -> Result<Option<u64>, FlopsError> {
        let conv = |x, w, transpose| ConvInputs { x, w, transpose };
        let n = match self.node.op_type.as_str() {
            "Conv" => self.conv(conv(0, 1, false))?,
            "ConvInteger" => self.conv(conv(0, 1, false))?,
            "QLinearConv" => self.conv(conv(0, 3, false))?,
            "ConvTranspose" => self.conv(conv(0, 1, true))?,
            "MatMul" | "MatMulInteger" | "QLinearMatMul" => self.matmul()?,
            "Gemm" => self.gemm()?,
            _ => return Ok(None),
        };
        n.map(Some)
            .ok_or_else(|| self.error("the FLOP count overflows 64 bits".into()))
    }

    fn tensor<'n>(&self, name: Option<&'n String>, what: &str) -> Result<&'n str, FlopsError> {
        name.map(String::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| self.error(format!("has no {what}")))
    }

    fn input_shape(&self, ix: usize) -> Result<Vec<usize>, FlopsError> {
        let name = self.tensor(self.node.input.get(ix), &format!("input {ix}"))?;
        self.shape(name)
    }

    fn output_shape(&self) -> Result<Vec<usize>, FlopsError> {
        let name = self.tensor(self.node.output.first(), "output")?;
        self.shape(name)
    }

    fn shape(&self, tensor: &str) -> Result<Vec<usize>, FlopsError> {
        self.shapes
            .get(tensor)
            .ok_or_else(|| FlopsError::UnknownShape {
                node: self.name(),
                op: self.node.op_type.clone(),
                tensor: tensor.to_owned(),
                input: self.input.to_vec(),
                why: self.why.to_owned(),
            })
    }

    fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.node.attribute.iter().find(|a| a.name == name)
    }

    fn conv(&self, at: ConvInputs) -> Result<Option<u64>, FlopsError> {
        let x = self.input_shape(at.x)?;
        let y = self.output_shape()?;
        if x.len() < 3 || y.len() != x.len() {
            return Err(self.error(format!(
                "expects [N, C, spatial...] input and output of one rank, got {x:?} -> {y:?}"
            )));
        }
        let group = self.attr("group").map_or(1, |a| a.i);
        let group = usize::try_from(group)
            .ok()
            .filter(|&g| g > 0)
            .ok_or_else(|| self.error(format!("group {group} is not positive")))?;
        // kernel_shape is optional in ONNX; the weight's dims always have it.
        let kernel = match self.attr("kernel_shape") {
            Some(a) => a
                .ints
                .iter()
                .map(|&k| usize::try_from(k).ok())
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| self.error(format!("kernel_shape {:?} is negative", a.ints)))?,
            None => self
                .input_shape(at.w)?
                .get(2..)
                .unwrap_or_default()
                .to_vec(),
        };
        if kernel.len() != x.len() - 2 {
            return Err(self.error(format!(
                "kernel {kernel:?} does not match the {}-D input {x:?}",
                x.len() - 2
            )));
        }
        // Every output (input, for the transpose) element takes
        // (channels / group) * prod(kernel) multiply-adds from the other side.
        let (per_elem, elems, channels) = if at.transpose {
            (y[1], &x, "output")
        } else {
            (x[1], &y, "input")
        };
        if per_elem % group != 0 {
            return Err(self.error(format!(
                "{per_elem} {channels} channels do not split into {group} groups"
            )));
        }
        Ok(product(elems.iter().chain(&kernel).copied())
            .and_then(|n| n.checked_mul((per_elem / group) as u64))
            .and_then(|n| n.checked_mul(2)))
    }

    /// `2 * prod(Y) * K`: Y is the broadcast batch dims times M x N (or
    /// less where A or B is 1-D), and each of its elements is a K-long dot
    /// product.
    fn matmul(&self) -> Result<Option<u64>, FlopsError> {
        let a = self.input_shape(0)?;
        let y = self.output_shape()?;
        let k = *a
            .last()
            .ok_or_else(|| self.error("input A is a scalar".into()))?;
        Ok(dot_products(&y, k))
    }

    fn gemm(&self) -> Result<Option<u64>, FlopsError> {
        let a = self.input_shape(0)?;
        let y = self.output_shape()?;
        if a.len() != 2 {
            return Err(self.error(format!("input A must be 2-D, it is {a:?}")));
        }
        let trans_a = self.attr("transA").is_some_and(|t| t.i != 0);
        Ok(dot_products(&y, if trans_a { a[0] } else { a[1] }))
    }
}

/// 2 FLOPs per multiply-add: `2 * prod(y) * k`.
fn dot_products(y: &[usize], k: usize) -> Option<u64> {
    product(y.iter().copied().chain([k, 2]))
}

fn product(it: impl IntoIterator<Item = usize>) -> Option<u64> {
    it.into_iter()
        .try_fold(1u64, |acc, d| acc.checked_mul(u64::try_from(d).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use infl8_onnx::builder::{Attr, Dim, GraphBuilder};
    use infl8_onnx::proto::{TensorProto, data_type};

    fn fixed(dims: &[i64]) -> Vec<Dim> {
        dims.iter().map(|&d| Dim::Fixed(d)).collect()
    }

    /// `[batch, channels, X, Y, Z]` with symbolic spatial dims.
    fn spatial3d(batch: &'static str, channels: i64) -> Vec<Dim> {
        vec![
            Dim::Symbolic(batch),
            Dim::Fixed(channels),
            Dim::Symbolic("X"),
            Dim::Symbolic("Y"),
            Dim::Symbolic("Z"),
        ]
    }

    fn flops(model: &ModelProto, shape: &[usize]) -> Result<Flops, FlopsError> {
        model_flops_from_bytes(&infl8_onnx::encode(model), shape)
    }

    fn zeros(n: i64) -> Vec<f32> {
        vec![0.0; n as usize]
    }

    fn i8_tensor(name: &str, dims: &[i64]) -> TensorProto {
        let n: i64 = dims.iter().product();
        TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: data_type::INT8,
            raw_data: vec![1; n as usize],
            ..Default::default()
        }
    }

    /// Two Conv3d layers: 3x3x3 stride 1, then grouped 3x3x3 stride 2.
    /// With `qdq`, the activations pass through QuantizeLinear /
    /// DequantizeLinear and the weights are int8 behind a DequantizeLinear
    /// (and the second conv leaves kernel_shape to its weight).
    fn conv3d_model(qdq: bool) -> ModelProto {
        let mut g = GraphBuilder::new("conv3d");
        let x = g.input("x", &spatial3d("N", 2));
        let scale = g.weight("scale", &[], &[0.1]);
        let zp = g.initializer(TensorProto {
            name: "zp".into(),
            dims: vec![],
            data_type: data_type::INT8,
            raw_data: vec![0],
            ..Default::default()
        });
        let weight = |g: &mut GraphBuilder, name: &str, dims: &[i64]| -> String {
            if qdq {
                let q = g.initializer(i8_tensor(name, dims));
                g.node("DequantizeLinear", &[&q, &scale, &zp], vec![])
            } else {
                g.weight(name, dims, &zeros(dims.iter().product()))
            }
        };
        let qdq_act = |g: &mut GraphBuilder, t: &str| -> String {
            if qdq {
                let q = g.node("QuantizeLinear", &[t, &scale, &zp], vec![]);
                g.node("DequantizeLinear", &[&q, &scale, &zp], vec![])
            } else {
                t.to_owned()
            }
        };
        let w1 = weight(&mut g, "w1", &[4, 2, 3, 3, 3]);
        let x1 = qdq_act(&mut g, &x);
        let h = g.node(
            "Conv",
            &[&x1, &w1],
            vec![
                ("kernel_shape", Attr::Ints(vec![3, 3, 3])),
                ("pads", Attr::Ints(vec![1; 6])),
            ],
        );
        let w2 = weight(&mut g, "w2", &[4, 2, 3, 3, 3]);
        let h = qdq_act(&mut g, &h);
        let mut attrs = vec![
            ("group", Attr::Int(2)),
            ("pads", Attr::Ints(vec![1; 6])),
            ("strides", Attr::Ints(vec![2, 2, 2])),
        ];
        if !qdq {
            attrs.push(("kernel_shape", Attr::Ints(vec![3, 3, 3])));
        }
        g.node("Conv", &[&h, &w2], attrs);
        g.rename_last_output("y");
        g.output("y", &spatial3d("N", 4));
        g.finish("test")
    }

    #[test]
    fn conv3d_counts_by_hand() {
        let f = flops(&conv3d_model(false), &[1, 2, 8, 8, 8]).unwrap();
        // 2 * N * Cout * out_voxels * Cin/group * kernel
        let first = 2 * 4 * 8 * 8 * 8 * 2 * 27;
        let second = 2 * 4 * 4 * 4 * 4 * (4 / 2) * 27;
        assert_eq!(f.total, first + second);
        assert_eq!(f.by_op.len(), 1);
        assert_eq!(f.by_op["Conv"], first + second);

        // Batch 3 triples it.
        let f3 = flops(&conv3d_model(false), &[3, 2, 8, 8, 8]).unwrap();
        assert_eq!(f3.total, 3 * f.total);
    }

    #[test]
    fn qdq_model_counts_as_its_float_original() {
        let float = flops(&conv3d_model(false), &[1, 2, 6, 7, 8]).unwrap();
        let qdq = flops(&conv3d_model(true), &[1, 2, 6, 7, 8]).unwrap();
        assert!(float.total > 0);
        assert_eq!(qdq, float);
    }

    #[test]
    fn matmul_broadcasts_batch_dims() {
        let mut g = GraphBuilder::new("matmul");
        let a = g.input("a", &fixed(&[2, 1, 5, 3]));
        let b = g.weight("b", &[4, 3, 6], &zeros(72));
        let ab = g.node("MatMul", &[&a, &b], vec![]);
        // A 1-D right operand: [2, 4, 5, 6] x [6] -> [2, 4, 5], K = 6.
        let v = g.weight("v", &[6], &zeros(6));
        let y = g.node("MatMul", &[&ab, &v], vec![]);
        g.output(&y, &fixed(&[2, 4, 5]));
        let f = flops(&g.finish("test"), &[2, 1, 5, 3]).unwrap();
        // [2, 1] and [4] broadcast to [2, 4]; M = 5, N = 6, K = 3.
        let batched = 2 * (2 * 4) * 5 * 6 * 3;
        let vector = 2 * (2 * 4 * 5) * 6;
        assert_eq!(f.by_op["MatMul"], batched + vector);
        assert_eq!(f.total, batched + vector);
    }

    #[test]
    fn gemm_honours_trans_a() {
        let mut g = GraphBuilder::new("gemm");
        let a = g.input("a", &fixed(&[7, 3]));
        let b = g.weight("b", &[4, 7], &zeros(28));
        let c = g.weight("c", &[4], &zeros(4));
        let y = g.node(
            "Gemm",
            &[&a, &b, &c],
            vec![("transA", Attr::Int(1)), ("transB", Attr::Int(1))],
        );
        g.output(&y, &fixed(&[3, 4]));
        let f = flops(&g.finish("test"), &[7, 3]).unwrap();
        assert_eq!(f.by_op["Gemm"], 2 * 3 * 4 * 7);
    }

    #[test]
    fn conv_transpose_counts_input_side() {
        let mut g = GraphBuilder::new("convt");
        let x = g.input("x", &spatial3d("N", 3));
        // [Cin, Cout / group, k...]
        let w = g.weight("w", &[3, 2, 2, 2, 2], &zeros(48));
        let y = g.node(
            "ConvTranspose",
            &[&x, &w],
            vec![
                ("kernel_shape", Attr::Ints(vec![2, 2, 2])),
                ("strides", Attr::Ints(vec![2, 2, 2])),
            ],
        );
        g.output(&y, &spatial3d("N", 2));
        let f = flops(&g.finish("test"), &[1, 3, 4, 4, 4]).unwrap();
        // 2 * N * Cin * in_voxels * Cout/group * kernel
        assert_eq!(f.by_op["ConvTranspose"], 2 * 3 * 64 * 2 * 8);
        assert_eq!(f.total, 6144);
    }

    #[test]
    fn example_model_at_its_window() {
        let m = infl8_onnx::examples::head_mask_model([4, 5, 6], 0.1, 1.0);
        let f = flops(&m, &[1, 1, 4, 5, 6]).unwrap();
        assert_eq!(f.total, 2 * 2 * 120 * 27);
        assert_eq!(f.to_string(), "0.00 GFLOP (Conv 0.00)");
    }

    #[test]
    fn unknown_shape_names_the_node() {
        let mut g = GraphBuilder::new("mystery");
        let x = g.input("x", &fixed(&[1, 1, 4, 4, 4]));
        let h = g.node("NoSuchOp", &[&x], vec![]);
        let w = g.weight("w", &[1, 1, 1, 1, 1], &[1.0]);
        g.node_named(
            "Conv",
            "head/conv",
            &[&h, &w],
            &["y"],
            vec![("kernel_shape", Attr::Ints(vec![1, 1, 1]))],
        );
        g.output("y", &fixed(&[1, 1, 4, 4, 4]));
        let err = flops(&g.finish("test"), &[1, 1, 4, 4, 4])
            .unwrap_err()
            .to_string();
        assert!(err.contains("head/conv") && err.contains(&h), "{err}");
    }

    #[test]
    fn wrong_input_rank_is_refused() {
        let m = infl8_onnx::examples::head_mask_model([4, 4, 4], 0.1, 1.0);
        let err = flops(&m, &[1, 4, 4, 4]).unwrap_err().to_string();
        assert!(err.contains("rank 5"), "{err}");
    }

    #[test]
    fn display_lists_each_op() {
        let f = Flops {
            total: 12_340_000_000,
            by_op: BTreeMap::from([
                ("Conv".into(), 1_230_000_000),
                ("MatMul".into(), 11_110_000_000),
            ]),
        };
        assert_eq!(f.to_string(), "12.34 GFLOP (Conv 1.23, MatMul 11.11)");
    }
}
