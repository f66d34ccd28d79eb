//! SafeTensors: reading any ViT checkpoint, writing the canonical one.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use ::safetensors::tensor::{Dtype, SafeTensors, View};

use super::names::{self, Elem, Entries, Entry, Hints};
use super::{ImportError, ImportOptions, ImportReport, SourceFormat, VIT2D_METADATA_KEY};
use crate::vit::{Vit2d, VitConfig};

pub(super) fn load(
    path: &Path,
    opts: &ImportOptions,
) -> Result<(Vit2d, ImportReport), ImportError> {
    let bytes = std::fs::read(path).map_err(|source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let parse_err = |message: String| ImportError::Parse {
        path: path.to_path_buf(),
        format: SourceFormat::Safetensors,
        message,
    };
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| parse_err(e.to_string()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| parse_err(e.to_string()))?;

    let mut entries = Entries::new();
    for (name, view) in st.tensors() {
        let elem = match view.dtype() {
            Dtype::F32 => Some(Elem::F32),
            Dtype::F64 => Some(Elem::F64),
            Dtype::F16 => Some(Elem::F16),
            Dtype::BF16 => Some(Elem::Bf16),
            _ => None,
        };
        let dtype = view.dtype();
        let data = view.data();
        entries.insert(
            name.clone(),
            Entry {
                shape: view.shape().to_vec(),
                origin: name.clone(),
                sources: vec![name],
                listed: true,
                load: Box::new(move || match elem {
                    Some(elem) => names::decode_le(data, elem),
                    None => Err(format!("unsupported element type {dtype:?}")),
                }),
            },
        );
    }

    let mut hints = Hints::default();
    if let Some(json) = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(VIT2D_METADATA_KEY))
    {
        let config: VitConfig = serde_json::from_str(json).map_err(|e| ImportError::Config {
            path: path.to_path_buf(),
            message: format!("unreadable {VIT2D_METADATA_KEY} metadata: {e}"),
        })?;
        hints.config = Some(config);
    } else {
        hf_config_beside(path, &mut hints);
    }
    names::assemble(path, SourceFormat::Safetensors, &entries, hints, opts)
}

/// Hugging Face repositories keep heads and eps in a `config.json` next to
/// the weights: read them when it is there and describes a ViT.
pub(super) fn hf_config_beside(path: &Path, hints: &mut Hints) {
    let Some(config_path) = path.parent().map(|d| d.join("config.json")) else {
        return;
    };
    let Ok(text) = std::fs::read_to_string(&config_path) else {
        return;
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        hints.notes.push(format!(
            "{} is not valid JSON; not used",
            config_path.display()
        ));
        return;
    };
    let from = format!("{}", config_path.display());
    if let Some(h) = json.get("num_attention_heads").and_then(|v| v.as_u64()) {
        hints.heads = Some((h as usize, from.clone()));
    }
    if let Some(e) = json.get("layer_norm_eps").and_then(|v| v.as_f64()) {
        hints.eps = Some((e, from));
    }
}

/// An f32 tensor owned for writing.
struct F32Tensor {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl F32Tensor {
    fn new(shape: &[usize], values: impl IntoIterator<Item = f32>) -> Self {
        Self {
            shape: shape.to_vec(),
            bytes: values.into_iter().flat_map(f32::to_le_bytes).collect(),
        }
    }
}

impl View for &F32Tensor {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

pub(super) fn save(path: &Path, vit: &Vit2d) -> Result<(), ImportError> {
    let write_err = |message: String| ImportError::Write {
        path: path.to_path_buf(),
        message,
    };
    names::validate(vit).map_err(write_err)?;
    let cfg = &vit.config;
    let c = cfg.width;
    let mut tensors: Vec<(String, F32Tensor)> = Vec::new();
    let mut put = |name: String, shape: &[usize], values: &mut dyn Iterator<Item = &f32>| {
        tensors.push((name, F32Tensor::new(shape, values.copied())));
    };
    // Arrays may be non-standard layouts (transposed views turned owned):
    // `iter()` walks logical row-major order whatever the strides.
    put(
        "patch_embed.proj.weight".into(),
        vit.patch_w.shape(),
        &mut vit.patch_w.iter(),
    );
    put(
        "patch_embed.proj.bias".into(),
        &[c],
        &mut vit.patch_b.iter(),
    );
    if let Some(cls) = &vit.cls {
        put("cls_token".into(), &[1, 1, c], &mut cls.iter());
    }
    put(
        "pos_embed".into(),
        &[1, vit.pos.nrows(), c],
        &mut vit.pos.iter(),
    );
    for (i, b) in vit.blocks.iter().enumerate() {
        let n = |rest: &str| format!("blocks.{i}.{rest}");
        put(n("norm1.weight"), &[c], &mut b.norm1_w.iter());
        put(n("norm1.bias"), &[c], &mut b.norm1_b.iter());
        put(n("attn.qkv.weight"), b.qkv_w.shape(), &mut b.qkv_w.iter());
        put(n("attn.qkv.bias"), &[3 * c], &mut b.qkv_b.iter());
        put(
            n("attn.proj.weight"),
            b.proj_w.shape(),
            &mut b.proj_w.iter(),
        );
        put(n("attn.proj.bias"), &[c], &mut b.proj_b.iter());
        if let Some(ls) = &b.ls1 {
            put(n("ls1.gamma"), &[c], &mut ls.iter());
        }
        put(n("norm2.weight"), &[c], &mut b.norm2_w.iter());
        put(n("norm2.bias"), &[c], &mut b.norm2_b.iter());
        put(n("mlp.fc1.weight"), b.fc1_w.shape(), &mut b.fc1_w.iter());
        put(n("mlp.fc1.bias"), b.fc1_b.shape(), &mut b.fc1_b.iter());
        put(n("mlp.fc2.weight"), b.fc2_w.shape(), &mut b.fc2_w.iter());
        put(n("mlp.fc2.bias"), &[c], &mut b.fc2_b.iter());
        if let Some(ls) = &b.ls2 {
            put(n("ls2.gamma"), &[c], &mut ls.iter());
        }
    }
    put("norm.weight".into(), &[c], &mut vit.norm_w.iter());
    put("norm.bias".into(), &[c], &mut vit.norm_b.iter());

    let config = serde_json::to_string(cfg).map_err(|e| write_err(e.to_string()))?;
    // One key only: the header serialises a HashMap, and a single entry
    // keeps the file byte-for-byte reproducible.
    let metadata = HashMap::from([(VIT2D_METADATA_KEY.to_owned(), config)]);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        return Err(write_err(format!("{} is not a directory", dir.display())));
    }
    // serialize_to_file writes a sibling temporary file and renames it.
    ::safetensors::serialize_to_file(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
        path,
    )
    .map_err(|e| write_err(e.to_string()))
}
