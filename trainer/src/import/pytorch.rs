//! PyTorch checkpoints (`torch.save` of a state dict, possibly nested under
//! `state_dict`/`model`/... keys), read by burn-store's pickle reader: no
//! Python, no libtorch.

use std::path::Path;

use burn::store::pytorch_reader::{DType, PytorchReader};

use super::names::{self, Elem, Entries, Entry, Hints};
use super::{ImportError, ImportOptions, ImportReport, SourceFormat};
use crate::vit::Vit2d;

pub(super) fn load(
    path: &Path,
    opts: &ImportOptions,
) -> Result<(Vit2d, ImportReport), ImportError> {
    // The reader's own messages do not name the file.
    std::fs::metadata(path).map_err(|source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = PytorchReader::new(path).map_err(|e| ImportError::Parse {
        path: path.to_path_buf(),
        format: SourceFormat::Pytorch,
        message: e.to_string(),
    })?;
    // Nested dictionaries come back as dotted names (`state_dict.blocks.0...`,
    // `model.backbone...`): the prefix search of `names` strips them.
    let mut entries = Entries::new();
    for (name, tensor) in reader.into_tensors() {
        let elem = match tensor.dtype() {
            DType::F32 => Some(Elem::F32),
            DType::F64 => Some(Elem::F64),
            DType::F16 => Some(Elem::F16),
            DType::BF16 => Some(Elem::Bf16),
            _ => None,
        };
        let shape = tensor.shape().to_vec();
        let dtype = tensor.dtype();
        entries.insert(
            name.clone(),
            Entry {
                shape,
                origin: name.clone(),
                sources: vec![name],
                listed: true,
                load: Box::new(move || {
                    let Some(elem) = elem else {
                        return Err(format!("unsupported element type {dtype:?}"));
                    };
                    // The reader hands native-endian bytes; it refuses
                    // big-endian files, and infl8 targets little-endian hosts.
                    let bytes = tensor.read().map_err(|e| e.to_string())?;
                    names::decode_le(&bytes, elem)
                }),
            },
        );
    }
    let mut hints = Hints::default();
    super::safetensors::hf_config_beside(path, &mut hints);
    names::assemble(path, SourceFormat::Pytorch, &entries, hints, opts)
}
