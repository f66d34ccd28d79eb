//! Building ONNX graphs node by node.

use crate::proto::{
    AttributeProto, AttributeType, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto, data_type, tensor_shape_proto,
    type_proto,
};

/// ONNX opset infl8 writes: 17 has LayerNormalization and is what TensorRT,
/// ONNX Runtime and tract all accept.
pub const OPSET: i64 = 17;
/// IR version matching opset 17.
pub const IR_VERSION: i64 = 8;

/// A dimension of a declared graph input/output.
#[derive(Clone, Debug)]
pub enum Dim {
    Fixed(i64),
    Symbolic(&'static str),
}

/// An attribute value.
#[derive(Clone, Debug)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Floats(Vec<f32>),
    String(String),
    Tensor(TensorProto),
}

impl Attr {
    fn into_proto(self, name: &str) -> AttributeProto {
        let mut a = AttributeProto {
            name: name.into(),
            ..Default::default()
        };
        // Readers (ONNX Runtime in particular) reject attributes whose `type`
        // is left UNDEFINED, so it is always set explicitly.
        match self {
            Attr::Int(i) => {
                a.i = i;
                a.r#type = AttributeType::Int as i32;
            }
            Attr::Ints(v) => {
                a.ints = v;
                a.r#type = AttributeType::Ints as i32;
            }
            Attr::Float(f) => {
                a.f = f;
                a.r#type = AttributeType::Float as i32;
            }
            Attr::Floats(v) => {
                a.floats = v;
                a.r#type = AttributeType::Floats as i32;
            }
            Attr::String(s) => {
                a.s = s.into_bytes();
                a.r#type = AttributeType::String as i32;
            }
            Attr::Tensor(t) => {
                a.t = Some(t);
                a.r#type = AttributeType::Tensor as i32;
            }
        }
        a
    }
}

/// An f32 tensor stored as little-endian raw data (compact, and what every
/// runtime reads fastest).
pub fn f32_tensor(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    let mut raw = Vec::with_capacity(data.len() * 4);
    for v in data {
        raw.extend_from_slice(&v.to_le_bytes());
    }
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: data_type::FLOAT,
        raw_data: raw,
        ..Default::default()
    }
}

pub fn i64_tensor(name: &str, dims: &[i64], data: &[i64]) -> TensorProto {
    let mut raw = Vec::with_capacity(data.len() * 8);
    for v in data {
        raw.extend_from_slice(&v.to_le_bytes());
    }
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: data_type::INT64,
        raw_data: raw,
        ..Default::default()
    }
}

fn value_info(name: &str, elem_type: i32, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Fixed(n) => tensor_shape_proto::dimension::Value::DimValue(*n),
                Dim::Symbolic(s) => tensor_shape_proto::dimension::Value::DimParam((*s).into()),
            }),
            denotation: String::new(),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type,
                shape: Some(TensorShapeProto { dim }),
            })),
            denotation: String::new(),
        }),
        doc_string: String::new(),
    }
}

/// Accumulates nodes and initializers; generates unique names.
#[derive(Default)]
pub struct GraphBuilder {
    graph: GraphProto,
    counter: usize,
}

impl GraphBuilder {
    pub fn new(name: &str) -> Self {
        GraphBuilder {
            graph: GraphProto {
                name: name.into(),
                ..Default::default()
            },
            counter: 0,
        }
    }

    pub fn input(&mut self, name: &str, dims: &[Dim]) -> String {
        self.graph
            .input
            .push(value_info(name, data_type::FLOAT, dims));
        name.into()
    }

    pub fn output(&mut self, name: &str, dims: &[Dim]) {
        self.graph
            .output
            .push(value_info(name, data_type::FLOAT, dims));
    }

    /// Adds an f32 initializer and returns its name.
    pub fn weight(&mut self, name: &str, dims: &[i64], data: &[f32]) -> String {
        self.graph.initializer.push(f32_tensor(name, dims, data));
        name.into()
    }

    pub fn weight_i64(&mut self, name: &str, dims: &[i64], data: &[i64]) -> String {
        self.graph.initializer.push(i64_tensor(name, dims, data));
        name.into()
    }

    pub fn initializer(&mut self, t: TensorProto) -> String {
        let name = t.name.clone();
        self.graph.initializer.push(t);
        name
    }

    pub fn has_initializer(&self, name: &str) -> bool {
        self.graph.initializer.iter().any(|t| t.name == name)
    }

    fn fresh(&mut self, op: &str) -> String {
        self.counter += 1;
        format!("{op}_{}", self.counter)
    }

    /// Adds a node with one output; returns the output's name.
    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let out = self.fresh(op);
        self.node_named(op, &out, inputs, &[&out], attrs);
        out
    }

    /// Adds a node with explicit node and output names.
    pub fn node_named(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: Vec<(&str, Attr)>,
    ) {
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| (*s).into()).collect(),
            output: outputs.iter().map(|s| (*s).into()).collect(),
            name: name.into(),
            op_type: op.into(),
            domain: String::new(),
            attribute: attrs.into_iter().map(|(n, a)| a.into_proto(n)).collect(),
            doc_string: String::new(),
        });
    }

    /// Renames the last node's output (to give the graph output a stable name).
    pub fn rename_last_output(&mut self, to: &str) {
        if let Some(n) = self.graph.node.last_mut()
            && let Some(o) = n.output.first_mut()
        {
            *o = to.into();
        }
    }

    pub fn finish(self, producer: &str) -> ModelProto {
        ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: producer.into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(self.graph),
            ..Default::default()
        }
    }
}
