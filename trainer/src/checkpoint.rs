//! Model checkpoints: the burn module's tensors in a safetensors file, with
//! the model configuration in its metadata so a checkpoint is self-contained.

use std::path::{Path, PathBuf};

use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::Device;

use infl8_core::manifest::Manifest;

use crate::model::{SegConfig, SegModel};

pub const CONFIG_KEY: &str = "infl8.seg_config";
/// How to run the model (preprocessing, labels), when the checkpoint comes
/// from fine-tuning: `export` then needs no flags.
pub const MANIFEST_KEY: &str = infl8_onnx::MANIFEST_KEY;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: cannot read the checkpoint: {detail}", .path.display())]
    Read { path: PathBuf, detail: String },
    #[error("{}: cannot write the checkpoint: {detail}", .path.display())]
    Write { path: PathBuf, detail: String },
    #[error("{}: not an infl8 checkpoint: {detail}", .path.display())]
    Format { path: PathBuf, detail: String },
}

/// Writes the model atomically (temporary file, then rename).
pub fn save(model: &SegModel, path: &Path) -> Result<(), CheckpointError> {
    save_with_manifest(model, path, None)
}

/// [`save`], recording the runtime manifest the model was trained for.
pub fn save_with_manifest(
    model: &SegModel,
    path: &Path,
    manifest: Option<&Manifest>,
) -> Result<(), CheckpointError> {
    let err = |detail: String| CheckpointError::Write {
        path: path.to_path_buf(),
        detail,
    };
    let config = serde_json::to_string(&model.config).map_err(|e| err(e.to_string()))?;
    let tmp = path.with_extension(format!("{}.part", std::process::id()));
    let mut store = SafetensorsStore::from_file(&tmp)
        .metadata(CONFIG_KEY, config)
        .overwrite(true);
    if let Some(m) = manifest {
        store = store.metadata(MANIFEST_KEY, m.to_json());
    }
    let result = model
        .save_into(&mut store)
        .map_err(|e| err(e.to_string()))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| err(e.to_string())));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn metadata(path: &Path) -> Result<std::collections::HashMap<String, String>, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|e| CheckpointError::Read {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| CheckpointError::Format {
            path: path.to_path_buf(),
            detail: format!("not a safetensors file ({e})"),
        })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// The runtime manifest recorded by fine-tuning, if any.
pub fn read_manifest(path: &Path) -> Result<Option<Manifest>, CheckpointError> {
    let meta = metadata(path)?;
    match meta.get(MANIFEST_KEY) {
        None => Ok(None),
        Some(json) => Manifest::from_json(json, path, "checkpoint metadata")
            .map(Some)
            .map_err(|e| CheckpointError::Format {
                path: path.to_path_buf(),
                detail: e.to_string(),
            }),
    }
}

/// The configuration stored in a checkpoint.
pub fn read_config(path: &Path) -> Result<SegConfig, CheckpointError> {
    let read_err = |detail: String| CheckpointError::Read {
        path: path.to_path_buf(),
        detail,
    };
    let format_err = |detail: String| CheckpointError::Format {
        path: path.to_path_buf(),
        detail,
    };
    let bytes = std::fs::read(path).map_err(|e| read_err(e.to_string()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| format_err(format!("not a safetensors file ({e})")))?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(CONFIG_KEY))
        .ok_or_else(|| format_err(format!("no `{CONFIG_KEY}` metadata")))?;
    let cfg: SegConfig = serde_json::from_str(json)
        .map_err(|e| format_err(format!("bad model configuration: {e}")))?;
    cfg.validate().map_err(format_err)?;
    Ok(cfg)
}

/// Rebuilds the model from a checkpoint; every parameter must be present.
pub fn load(path: &Path, device: &Device) -> Result<SegModel, CheckpointError> {
    let cfg = read_config(path)?;
    let format_err = |detail: String| CheckpointError::Format {
        path: path.to_path_buf(),
        detail,
    };
    let mut model = SegModel::random(cfg, device).map_err(&format_err)?;
    let mut store = SafetensorsStore::from_file(path).allow_partial(false);
    let result = model
        .load_from(&mut store)
        .map_err(|e| format_err(e.to_string()))?;
    if !result.missing.is_empty() || !result.errors.is_empty() {
        let missing: Vec<&str> = result
            .missing
            .iter()
            .map(|(p, _)| p.as_str())
            .take(5)
            .collect();
        return Err(format_err(format!(
            "missing tensors {missing:?}, errors {:?}",
            result
                .errors
                .iter()
                .take(3)
                .map(|e| format!("{e:?}"))
                .collect::<Vec<_>>()
        )));
    }
    Ok(model)
}
