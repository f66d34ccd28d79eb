//! ONNX exports of ViTs (PyTorch's exporter, HF or timm models). Named
//! initializers keep their module names, but the exporter folds each
//! Linear's transposed weight into an unnamed `onnx::MatMul_*` initializer,
//! in no useful order: such tensors are named after the node consuming them
//! (`/backbone/encoder/layer.0/attention/attention/query/MatMul` gives
//! `backbone.encoder.layer.0.attention.attention.query.weight`) and
//! transposed back to `[out, in]`. Heads and eps are read off graph
//! constants.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use infl8_onnx::OnnxError;
use infl8_onnx::proto::{GraphProto, NodeProto, TensorProto};

use super::names::{self, Elem, Entries, Entry, Hints};
use super::{ImportError, ImportOptions, ImportReport, Naming, SourceFormat, VIT2D_METADATA_KEY};
use crate::vit::{Vit2d, VitConfig};

/// `TensorProto.DataType` values this reader handles (`infl8_onnx` names
/// only some).
mod dt {
    pub const FLOAT: i32 = 1;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
    pub const FLOAT16: i32 = 10;
    pub const DOUBLE: i32 = 11;
    pub const BFLOAT16: i32 = 16;
}

/// `TensorProto.DataLocation.EXTERNAL`.
const EXTERNAL: i32 = 1;

fn numel(t: &TensorProto) -> usize {
    t.dims.iter().map(|&d| d.max(0) as usize).product()
}

/// Float values of a tensor, whatever field holds them.
fn float_values(t: &TensorProto) -> Result<Vec<f32>, String> {
    if t.data_location == EXTERNAL {
        return Err(
            "its data is stored outside the model file (external data), which this \
                    importer does not read"
                .into(),
        );
    }
    let raw = !t.raw_data.is_empty();
    let half_bits = |elem| -> Result<Vec<f32>, String> {
        // Without raw_data, 16-bit floats sit in int32_data, one per entry.
        let bytes: Vec<u8> = t
            .int32_data
            .iter()
            .flat_map(|&v| (v as u16).to_le_bytes())
            .collect();
        names::decode_le(&bytes, elem)
    };
    let values = match t.data_type {
        dt::FLOAT if raw => names::decode_le(&t.raw_data, Elem::F32)?,
        dt::FLOAT => t.float_data.clone(),
        dt::DOUBLE if raw => names::decode_le(&t.raw_data, Elem::F64)?,
        dt::DOUBLE => t.double_data.iter().map(|&v| v as f32).collect(),
        dt::FLOAT16 if raw => names::decode_le(&t.raw_data, Elem::F16)?,
        dt::FLOAT16 => half_bits(Elem::F16)?,
        dt::BFLOAT16 if raw => names::decode_le(&t.raw_data, Elem::Bf16)?,
        dt::BFLOAT16 => half_bits(Elem::Bf16)?,
        other => return Err(format!("unsupported ONNX element type {other}")),
    };
    if values.len() != numel(t) {
        return Err(format!(
            "holds {} values, its dims {:?} need {}",
            values.len(),
            t.dims,
            numel(t)
        ));
    }
    Ok(values)
}

/// Integer values of a small (shape) tensor.
fn int_values(t: &TensorProto) -> Option<Vec<i64>> {
    let raw = &t.raw_data;
    match t.data_type {
        dt::INT64 if !raw.is_empty() => Some(
            raw.chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        ),
        dt::INT64 => Some(t.int64_data.clone()),
        dt::INT32 if !raw.is_empty() => Some(
            raw.chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
        ),
        dt::INT32 => Some(t.int32_data.iter().map(|&v| v as i64).collect()),
        _ => None,
    }
}

/// Every tensor with a value in the graph: initializers and the outputs of
/// Constant nodes (some exporters put weights there).
struct Tensors<'m> {
    map: HashMap<&'m str, (&'m TensorProto, bool)>,
}

impl<'m> Tensors<'m> {
    fn new(graph: &'m GraphProto) -> Self {
        let mut map = HashMap::new();
        for t in &graph.initializer {
            map.insert(t.name.as_str(), (t, true));
        }
        for node in &graph.node {
            if node.op_type != "Constant" {
                continue;
            }
            let value = node
                .attribute
                .iter()
                .find(|a| a.name == "value")
                .and_then(|a| a.t.as_ref());
            if let (Some(t), Some(out)) = (value, node.output.first()) {
                map.insert(out.as_str(), (t, false));
            }
        }
        Self { map }
    }

    fn get(&self, name: &str) -> Option<&'m TensorProto> {
        self.map.get(name).map(|(t, _)| *t)
    }

    fn scalar(&self, name: &str) -> Option<f64> {
        let t = self.get(name)?;
        if numel(t) != 1 {
            return None;
        }
        float_values(t).ok()?.first().map(|&v| f64::from(v))
    }
}

/// Whether a tensor name is a module path (`backbone.layernorm.weight`)
/// rather than one the exporter made up (`onnx::MatMul_1966`, `/x/Constant_output_0`).
fn is_param_name(name: &str) -> bool {
    !name.contains("::") && !name.starts_with('/')
}

/// How a tensor's consumer names it: module-path alias, and whether the
/// values are `[in, out]` and need transposing.
fn alias_for(node: &NodeProto, input: usize, t: &TensorProto) -> Option<(String, bool)> {
    // Exporter scopes look like `/backbone/encoder/layer.0/mlp/fc1/MatMul`.
    let scoped = node.name.strip_prefix('/')?;
    let (module, _op) = scoped.rsplit_once('/')?;
    let module = module.replace('/', ".");
    let rank = t.dims.len();
    let vector = rank >= 1 && t.dims[..rank - 1].iter().all(|&d| d == 1) && numel(t) > 1;
    let leaf = module.rsplit('.').next().unwrap_or("");
    let suffix = match (node.op_type.as_str(), input) {
        ("MatMul", 1) if rank == 2 => return Some((format!("{module}.weight"), true)),
        ("Gemm", 1) if rank == 2 => {
            let trans_b = node
                .attribute
                .iter()
                .find(|a| a.name == "transB")
                .is_some_and(|a| a.i != 0);
            return Some((format!("{module}.weight"), !trans_b));
        }
        ("Gemm", 2) | ("Conv", 2) | ("LayerNormalization", 2) => "bias",
        ("Conv", 1) | ("LayerNormalization", 1) => "weight",
        ("Add", _) if vector => "bias",
        ("Mul", _) if vector && leaf.starts_with("layer_scale") => "lambda1",
        ("Mul", _) if vector && (leaf == "ls1" || leaf == "ls2") => "gamma",
        ("Mul", _) if vector => "weight",
        _ => return None,
    };
    Some((format!("{module}.{suffix}"), false))
}

fn transposed(values: Vec<f32>, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

fn dims_usize(t: &TensorProto) -> Option<Vec<usize>> {
    t.dims.iter().map(|&d| usize::try_from(d).ok()).collect()
}

pub(super) fn load(
    path: &Path,
    opts: &ImportOptions,
) -> Result<(Vit2d, ImportReport), ImportError> {
    let model = infl8_onnx::read_model(path).map_err(|e| match e {
        OnnxError::Io { source, .. } => ImportError::Io {
            path: path.to_path_buf(),
            source,
        },
        OnnxError::Decode { message, .. } => ImportError::Parse {
            path: path.to_path_buf(),
            format: SourceFormat::Onnx,
            message,
        },
        other => ImportError::Parse {
            path: path.to_path_buf(),
            format: SourceFormat::Onnx,
            message: other.to_string(),
        },
    })?;
    let Some(graph) = model.graph.as_ref() else {
        return Err(ImportError::Parse {
            path: path.to_path_buf(),
            format: SourceFormat::Onnx,
            message: "the file has no graph".into(),
        });
    };
    let tensors = Tensors::new(graph);
    let mut consumers: HashMap<&str, Vec<(&NodeProto, usize)>> = HashMap::new();
    let mut producer: HashMap<&str, &NodeProto> = HashMap::new();
    for node in &graph.node {
        for (i, input) in node.input.iter().enumerate() {
            consumers.entry(input.as_str()).or_default().push((node, i));
        }
        for out in &node.output {
            producer.insert(out.as_str(), node);
        }
    }

    let mut entries = Entries::new();
    let mut hints = Hints::default();
    // Aliases by consumer; several different tensors claiming one name make
    // it unusable rather than picked at random.
    let mut aliases: BTreeMap<String, Vec<(&str, bool)>> = BTreeMap::new();
    for (&name, &(t, is_init)) in &tensors.map {
        let Some(shape) = dims_usize(t) else {
            continue;
        };
        entries.insert(
            name.to_owned(),
            Entry {
                shape,
                origin: name.to_owned(),
                sources: vec![name.to_owned()],
                listed: is_init,
                load: Box::new(move || float_values(t)),
            },
        );
        if is_init && is_param_name(name) {
            continue;
        }
        for (node, input) in consumers.get(name).into_iter().flatten() {
            if let Some((alias, transpose)) = alias_for(node, *input, t) {
                let claims = aliases.entry(alias).or_default();
                if !claims.iter().any(|(n, _)| *n == name) {
                    claims.push((name, transpose));
                }
            }
        }
    }
    let mut renamed = 0usize;
    for (alias, claims) in aliases {
        if entries.contains_key(&alias) {
            continue;
        }
        let [(name, transpose)] = claims[..] else {
            let names: Vec<&str> = claims.iter().map(|(n, _)| *n).collect();
            hints.notes.push(format!(
                "{alias}: several tensors ({}) fit; none taken",
                names.join(", ")
            ));
            continue;
        };
        let Some(t) = tensors.get(name) else { continue };
        let Some(mut shape) = dims_usize(t) else {
            continue;
        };
        let origin = if transpose {
            shape.reverse();
            format!("{name}, transposed")
        } else {
            name.to_owned()
        };
        let (rows, cols) = (shape.get(1).copied(), shape.first().copied());
        entries.insert(
            alias,
            Entry {
                shape,
                origin,
                sources: vec![name.to_owned()],
                listed: false,
                load: Box::new(move || {
                    let values = float_values(t)?;
                    Ok(match (transpose, rows, cols) {
                        (true, Some(r), Some(c)) => transposed(values, r, c),
                        _ => values,
                    })
                }),
            },
        );
        renamed += 1;
    }
    if renamed > 0 {
        hints.notes.push(format!(
            "{renamed} unnamed tensors named after the node consuming them (MatMul weights \
             transposed from [in, out])"
        ));
    }

    // The patch embedding locates the backbone; failing that the file is
    // not a ViT, which names::assemble reports.
    if let Ok((prefix, naming, _)) = names::find_backbone(path, &entries, opts) {
        let anchor = match naming {
            Naming::Timm => format!("{prefix}patch_embed.proj.weight"),
            Naming::Hf => format!("{prefix}embeddings.patch_embeddings.projection.weight"),
        };
        let width = entries
            .get(&anchor)
            .and_then(|e| e.shape.first().copied())
            .unwrap_or(0);
        let pos_name = match naming {
            Naming::Timm => format!("{prefix}pos_embed"),
            Naming::Hf => format!("{prefix}embeddings.position_embeddings"),
        };
        if !entries.contains_key(&pos_name)
            && let Some(pos) = position_table(&tensors, &consumers, width, &mut hints)
        {
            entries.insert(pos_name, pos);
        }
        hints.heads = heads_from_graph(graph, &tensors, &producer, width);
    }
    hints.eps = eps_from_graph(graph, &tensors, &producer);
    if let Some(json) = infl8_onnx::metadata(&model, VIT2D_METADATA_KEY) {
        let config: VitConfig = serde_json::from_str(json).map_err(|e| ImportError::Config {
            path: path.to_path_buf(),
            message: format!("unreadable {VIT2D_METADATA_KEY} metadata: {e}"),
        })?;
        hints.config = Some(config);
    }
    names::assemble(path, SourceFormat::Onnx, &entries, hints, opts)
}

/// HF exports that interpolate the position table to the input size fold
/// it into two unnamed constants: the cls row `[1, 1, C]` (fed to a Concat)
/// and the patch grid `[1, N, C]` (reshaped to a square for the resize).
fn position_table<'m>(
    tensors: &Tensors<'m>,
    consumers: &HashMap<&str, Vec<(&NodeProto, usize)>>,
    width: usize,
    hints: &mut Hints,
) -> Option<Entry<'m>> {
    let w = width as i64;
    let mut tables: Vec<(&'m str, &'m TensorProto)> = Vec::new();
    let mut cls_rows: Vec<(&'m str, &'m TensorProto)> = Vec::new();
    for (&name, &(t, is_init)) in &tensors.map {
        // Named parameters (the cls token itself) are not folded constants.
        if is_init && is_param_name(name) {
            continue;
        }
        match t.dims[..] {
            [1, 1, c] if c == w => {
                let into_concat = consumers
                    .get(name)
                    .is_some_and(|cs| cs.iter().any(|(n, _)| n.op_type == "Concat"));
                if into_concat {
                    cls_rows.push((name, t));
                }
            }
            [1, n, c] if c == w && n > 1 => tables.push((name, t)),
            _ => {}
        }
    }
    let [(table_name, table)] = tables[..] else {
        if tables.len() > 1 {
            let names: Vec<&str> = tables.iter().map(|(n, _)| *n).collect();
            hints.notes.push(format!(
                "several unnamed tensors could be the position table ({}); none taken",
                names.join(", ")
            ));
        }
        return None;
    };
    let n = table.dims[1] as usize;
    let square = |k: usize| {
        let r = (k as f64).sqrt().round() as usize;
        r * r == k
    };
    // Only a bare grid wants the cls row in front.
    if let ([(cls_name, cls)], true) = (&cls_rows[..], square(n)) {
        let (cls, cls_name) = (*cls, *cls_name);
        hints.notes.push(format!(
            "position table pieced together from {cls_name} (cls) and {table_name} (grid)"
        ));
        return Some(Entry {
            shape: vec![1, n + 1, width],
            origin: format!("{cls_name} + {table_name}"),
            sources: vec![cls_name.to_owned(), table_name.to_owned()],
            listed: false,
            load: Box::new(move || {
                let mut v = float_values(cls)?;
                v.extend(float_values(table)?);
                Ok(v)
            }),
        });
    }
    hints
        .notes
        .push(format!("position table taken from {table_name}"));
    Some(Entry {
        shape: vec![1, n, width],
        origin: table_name.to_owned(),
        sources: vec![table_name.to_owned()],
        listed: false,
        load: Box::new(move || float_values(table)),
    })
}

/// The first LayerNorm's epsilon: a LayerNormalization attribute, or the
/// scalar added to the variance in a decomposed one.
fn eps_from_graph(
    graph: &GraphProto,
    tensors: &Tensors,
    producer: &HashMap<&str, &NodeProto>,
) -> Option<(f64, String)> {
    for node in &graph.node {
        match node.op_type.as_str() {
            "LayerNormalization" => {
                let eps = node
                    .attribute
                    .iter()
                    .find(|a| a.name == "epsilon")
                    .map_or(1e-5, |a| f64::from(a.f));
                return Some((round_f32(eps), format!("ONNX node {}", node.name)));
            }
            "Add" if node.input.len() == 2 => {
                let from_mean = node.input.iter().any(|i| {
                    producer
                        .get(i.as_str())
                        .is_some_and(|p| p.op_type == "ReduceMean")
                });
                let eps = node.input.iter().find_map(|i| tensors.scalar(i));
                if let (true, Some(eps)) = (from_mean, eps)
                    && eps > 0.0
                    && eps < 1e-3
                {
                    return Some((round_f32(eps), format!("ONNX node {}", node.name)));
                }
            }
            _ => {}
        }
    }
    None
}

/// ONNX stores eps as f32: 1e-6 comes back as 9.99999997e-7. The nearest
/// short decimal is what the model was built with.
fn round_f32(v: f64) -> f64 {
    let s = format!("{}", v as f32);
    s.parse().unwrap_or(v)
}

/// Heads from the attention's reshape to `[.., heads, head_dim]`.
fn heads_from_graph(
    graph: &GraphProto,
    tensors: &Tensors,
    producer: &HashMap<&str, &NodeProto>,
    width: usize,
) -> Option<(usize, String)> {
    let scalar_int = |name: &str| -> Option<i64> {
        let v = int_values(tensors.get(name)?)?;
        match v[..] {
            [x] => Some(x),
            _ => None,
        }
    };
    for node in &graph.node {
        let in_attention = node.name.contains("/attention/") || node.name.contains("/attn/");
        if node.op_type != "Reshape" || !in_attention {
            continue;
        }
        let Some(shape_in) = node.input.get(1) else {
            continue;
        };
        let dims: Option<Vec<i64>> = match tensors.get(shape_in) {
            Some(t) => int_values(t),
            None => producer
                .get(shape_in.as_str())
                .filter(|p| p.op_type == "Concat")
                .map(|p| {
                    p.input
                        .iter()
                        .map(|i| scalar_int(i).unwrap_or(-1))
                        .collect()
                }),
        };
        let Some(dims) = dims else { continue };
        if let [.., h, d] = dims[..]
            && h > 1
            && d > 0
            && (h * d) as usize == width
        {
            return Some((h as usize, format!("ONNX node {}", node.name)));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, name: &str) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            name: name.into(),
            ..Default::default()
        }
    }

    fn tensor(dims: &[i64]) -> TensorProto {
        TensorProto {
            dims: dims.to_vec(),
            data_type: dt::FLOAT,
            ..Default::default()
        }
    }

    #[test]
    fn consumers_name_unnamed_tensors() {
        let q = node(
            "MatMul",
            "/backbone/encoder/layer.0/attention/attention/query/MatMul",
        );
        assert_eq!(
            alias_for(&q, 1, &tensor(&[8, 8])),
            Some((
                "backbone.encoder.layer.0.attention.attention.query.weight".into(),
                true
            ))
        );
        // The activation side of a MatMul is not a weight.
        assert_eq!(alias_for(&q, 0, &tensor(&[8, 8])), None);
        let ls = node("Mul", "/backbone/encoder/layer.0/layer_scale1/Mul");
        assert_eq!(
            alias_for(&ls, 1, &tensor(&[8])).map(|a| a.0),
            Some("backbone.encoder.layer.0.layer_scale1.lambda1".into())
        );
        // A LayerNorm's epsilon is a scalar, not a bias.
        let eps = node("Add", "/backbone/encoder/layer.0/norm1/Add");
        assert_eq!(alias_for(&eps, 1, &tensor(&[])), None);
        // Scope-less node names (not PyTorch's exporter) give nothing.
        assert_eq!(
            alias_for(&node("MatMul", "MatMul_3"), 1, &tensor(&[8, 8])),
            None
        );
        let gemm = NodeProto {
            attribute: vec![infl8_onnx::proto::AttributeProto {
                name: "transB".into(),
                i: 1,
                ..Default::default()
            }],
            ..node("Gemm", "/head/Gemm")
        };
        assert_eq!(
            alias_for(&gemm, 1, &tensor(&[4, 8])),
            Some(("head.weight".into(), false))
        );
    }

    #[test]
    fn transposes_row_major() {
        // [[1, 2, 3], [4, 5, 6]] -> [[1, 4], [2, 5], [3, 6]]
        assert_eq!(
            transposed(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3),
            [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
        );
    }

    #[test]
    fn eps_is_read_back_as_written() {
        assert_eq!(round_f32(f64::from(1e-6f32)), 1e-6);
        assert_eq!(round_f32(f64::from(1e-12f32)), 1e-12);
        assert_eq!(round_f32(f64::from(1e-5f32)), 1e-5);
    }

    #[test]
    fn external_data_is_refused_by_name() {
        let t = TensorProto {
            data_location: EXTERNAL,
            ..tensor(&[2])
        };
        assert!(float_values(&t).unwrap_err().contains("external data"));
    }
}
