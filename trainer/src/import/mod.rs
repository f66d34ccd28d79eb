//! Importers of pretrained 2D ViT backbones: SafeTensors and PyTorch
//! checkpoints with timm or Hugging Face names, and ONNX exports, all read
//! into the framework-free [`Vit2d`]. [`save_vit2d`] writes the canonical
//! form (timm names, config in the SafeTensors metadata) that later steps
//! read back exactly.

pub(crate) mod names;
mod onnx;
mod pytorch;
mod safetensors;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::vit::{Vit2d, VitConfig};

pub use names::validate;

/// Key of the SafeTensors `__metadata__` entry (and ONNX metadata entry)
/// holding the [`VitConfig`] as JSON.
pub const VIT2D_METADATA_KEY: &str = "infl8.vit2d";

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: unknown weight file type (expected .safetensors, .pt, .pth, .bin or .onnx)")]
    UnknownFormat { path: PathBuf },
    #[error("{path} is not a valid {format} file: {message}")]
    Parse {
        path: PathBuf,
        format: SourceFormat,
        message: String,
    },
    #[error("{path} does not hold a ViT backbone: {message}")]
    NotAVit { path: PathBuf, message: String },
    #[error("{path}: missing required tensor(s): {}", list(.tensors))]
    Missing { path: PathBuf, tensors: Vec<String> },
    #[error("{path}: tensor {tensor} has shape {found:?}, expected {expected}")]
    Shape {
        path: PathBuf,
        tensor: String,
        expected: String,
        found: Vec<usize>,
    },
    #[error("{path}: cannot read tensor {tensor}: {message}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Unsupported { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
}

fn list(names: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut s = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" (and {} more)", names.len() - SHOWN));
    }
    s
}

/// Container the weights came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFormat {
    Safetensors,
    Pytorch,
    Onnx,
}

impl fmt::Display for SourceFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceFormat::Safetensors => "SafeTensors",
            SourceFormat::Pytorch => "PyTorch",
            SourceFormat::Onnx => "ONNX",
        })
    }
}

/// Parameter naming scheme the weights follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// timm `VisionTransformer` and the original DINOv2 repository
    /// (`patch_embed.proj`, `blocks.N.attn.qkv`, ...).
    Timm,
    /// Hugging Face `ViTModel` / `Dinov2Model` (`embeddings.patch_embeddings`,
    /// `encoder.layer.N.attention.attention.query`, ...). ONNX exports of
    /// those models keep these names (their unnamed MatMul weights are named
    /// after the node that consumes them).
    Hf,
}

impl fmt::Display for Naming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Naming::Timm => "timm",
            Naming::Hf => "hf",
        })
    }
}

/// Overrides for what the weights cannot tell.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImportOptions {
    /// Attention heads. No tensor carries them: without this, the file's
    /// metadata (infl8, HF `config.json`, ONNX graph constants) or the
    /// width/64 rule of ViT-S/B/L/g decides.
    pub heads: Option<usize>,
    /// LayerNorm epsilon; defaults to 1e-6 (timm, DINOv2) or 1e-12 (HF ViT).
    pub eps: Option<f64>,
    /// Name prefix of the backbone (`"teacher.backbone."`), for files that
    /// hold several (student/teacher checkpoints). Detected when `None`.
    pub prefix: Option<String>,
}

/// What an import read, left out and assumed.
#[derive(Clone, Debug)]
pub struct ImportReport {
    pub source: PathBuf,
    pub format: SourceFormat,
    pub naming: Naming,
    /// Prefix stripped from every backbone tensor name (`"backbone."`).
    pub prefix: String,
    pub config: VitConfig,
    /// Tensors read into the backbone, by their name in the file.
    pub loaded: Vec<String>,
    /// Optional tensors that are absent and were filled with their neutral
    /// value (zero biases), by the name they would have had.
    pub missing: Vec<String>,
    /// Tensors of the file that are not part of the backbone (heads,
    /// `mask_token`, register tokens, other models of a checkpoint).
    pub ignored: Vec<String>,
    /// Where heads and eps came from, and other assumptions worth a look.
    pub notes: Vec<String>,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        write!(
            f,
            "{}: {} weights with {} names",
            self.source.display(),
            self.format,
            self.naming
        )?;
        if !self.prefix.is_empty() {
            write!(f, " under `{}`", self.prefix)?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "  ViT: patch {p}, width {w}, depth {d}, heads {h}, mlp {m}, {ch} input channels, \
             grid {gr}x{gc}, cls token {cls}, layer scale {ls}, eps {eps:e}",
            p = c.patch,
            w = c.width,
            d = c.depth,
            h = c.heads,
            m = c.mlp,
            ch = c.in_chans,
            gr = c.grid[0],
            gc = c.grid[1],
            cls = yes_no(c.cls_token),
            ls = yes_no(c.layer_scale),
            eps = c.eps,
        )?;
        writeln!(f, "  loaded {} tensors", self.loaded.len())?;
        if !self.missing.is_empty() {
            writeln!(f, "  absent, filled with zeros: {}", list(&self.missing))?;
        }
        if !self.ignored.is_empty() {
            writeln!(
                f,
                "  ignored {} tensors: {}",
                self.ignored.len(),
                list(&self.ignored)
            )?;
        }
        for note in &self.notes {
            writeln!(f, "  note: {note}")?;
        }
        Ok(())
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Reads a ViT backbone from `path`, choosing the reader by extension.
pub fn load_vit2d(path: impl AsRef<Path>) -> Result<(Vit2d, ImportReport), ImportError> {
    load_vit2d_with(path, &ImportOptions::default())
}

/// [`load_vit2d`] with overrides.
pub fn load_vit2d_with(
    path: impl AsRef<Path>,
    opts: &ImportOptions,
) -> Result<(Vit2d, ImportReport), ImportError> {
    let path = path.as_ref();
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "safetensors" => safetensors::load(path, opts),
        "pt" | "pth" | "bin" => pytorch::load(path, opts),
        "onnx" => onnx::load(path, opts),
        _ => Err(ImportError::UnknownFormat {
            path: path.to_path_buf(),
        }),
    }
}

/// Writes `vit` as the canonical SafeTensors file: timm names, f32, and the
/// config as JSON under [`VIT2D_METADATA_KEY`]. The write is atomic.
pub fn save_vit2d(path: impl AsRef<Path>, vit: &Vit2d) -> Result<(), ImportError> {
    safetensors::save(path.as_ref(), vit)
}
