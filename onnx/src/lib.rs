//! ONNX models without an ML framework: decode a model's metadata and I/O
//! signature, and build graphs node by node (example models, exporters).

pub mod builder;
pub mod examples;
pub mod proto;

use std::path::{Path, PathBuf};

use prost::Message;

pub use builder::GraphBuilder;
pub use proto::ModelProto;

/// The metadata key under which infl8 stores a model's manifest (JSON).
pub const MANIFEST_KEY: &str = "infl8.manifest";
/// The metadata key of the record `infl8-train quantize` leaves (JSON).
pub const QUANTIZATION_KEY: &str = "infl8.quantization";

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("cannot read ONNX model {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid ONNX model: {message}")]
    Decode { path: PathBuf, message: String },
    #[error("cannot write ONNX model {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One dimension of a graph input/output as declared in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeclaredDim {
    Fixed(i64),
    Symbolic(String),
    Unknown,
}

/// A graph input or output as declared in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeclaredTensor {
    pub name: String,
    pub elem_type: i32,
    pub shape: Option<Vec<DeclaredDim>>,
}

pub fn decode(bytes: &[u8], path: &Path) -> Result<ModelProto, OnnxError> {
    let model = ModelProto::decode(bytes).map_err(|e| OnnxError::Decode {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if model.graph.is_none() {
        return Err(OnnxError::Decode {
            path: path.to_path_buf(),
            message: "the file has no graph".into(),
        });
    }
    Ok(model)
}

/// The model's serialised bytes.
pub fn encode(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

pub fn read_model(path: &Path) -> Result<ModelProto, OnnxError> {
    let bytes = std::fs::read(path).map_err(|source| OnnxError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode(&bytes, path)
}

/// Writes the model atomically: a reader never sees a half-written file.
pub fn write_model(model: &ModelProto, path: &Path) -> Result<(), OnnxError> {
    use std::io::Write;
    let err = |source| OnnxError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model.onnx".into());
    let tmp = dir.join(format!(".{name}.{}.part", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&model.encode_to_vec())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}

pub fn metadata<'a>(model: &'a ModelProto, key: &str) -> Option<&'a str> {
    model
        .metadata_props
        .iter()
        .find(|p| p.key == key)
        .map(|p| p.value.as_str())
}

/// Sets (or replaces) a metadata entry.
pub fn set_metadata(model: &mut ModelProto, key: &str, value: &str) {
    model.metadata_props.retain(|p| p.key != key);
    model.metadata_props.push(proto::StringStringEntryProto {
        key: key.into(),
        value: value.into(),
    });
}

fn declared(v: &proto::ValueInfoProto) -> DeclaredTensor {
    let (elem_type, shape) = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(proto::type_proto::Value::TensorType(t)) => (
            t.elem_type,
            t.shape.as_ref().map(|s| {
                s.dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(proto::tensor_shape_proto::dimension::Value::DimValue(n)) => {
                            DeclaredDim::Fixed(*n)
                        }
                        Some(proto::tensor_shape_proto::dimension::Value::DimParam(p)) => {
                            DeclaredDim::Symbolic(p.clone())
                        }
                        None => DeclaredDim::Unknown,
                    })
                    .collect()
            }),
        ),
        None => (0, None),
    };
    DeclaredTensor {
        name: v.name.clone(),
        elem_type,
        shape,
    }
}

/// Graph inputs that are real inputs (not initializers listed as inputs, as
/// older exporters do).
pub fn inputs(model: &ModelProto) -> Vec<DeclaredTensor> {
    let Some(g) = &model.graph else {
        return vec![];
    };
    let inits: std::collections::HashSet<&str> =
        g.initializer.iter().map(|t| t.name.as_str()).collect();
    g.input
        .iter()
        .filter(|i| !inits.contains(i.name.as_str()))
        .map(declared)
        .collect()
}

pub fn outputs(model: &ModelProto) -> Vec<DeclaredTensor> {
    model
        .graph
        .as_ref()
        .map(|g| g.output.iter().map(declared).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_a_decode_error_naming_the_file() {
        let err = decode(b"\xff\xff\xff\xff not onnx", Path::new("x.onnx")).unwrap_err();
        assert!(err.to_string().contains("x.onnx"), "{err}");
    }

    #[test]
    fn metadata_set_replaces() {
        let mut m = ModelProto::default();
        set_metadata(&mut m, "k", "1");
        set_metadata(&mut m, "k", "2");
        assert_eq!(metadata(&m, "k"), Some("2"));
        assert_eq!(m.metadata_props.len(), 1);
    }
}
