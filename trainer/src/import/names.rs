//! From named tensors to a [`Vit2d`]: finding the backbone among a file's
//! tensors, the timm and HF naming schemes, config inference and the checks
//! that make a bad file fail with its name and the tensor at fault.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use ndarray::{Array1, Array2, Array4};

use super::{ImportError, ImportOptions, ImportReport, Naming, SourceFormat};
use crate::vit::{BlockWeights, Vit2d, VitConfig};

/// Reads a tensor's values as f32, row-major. Lazy so that a checkpoint's
/// heads and optimizer state are never decoded.
pub(crate) type Loader<'a> = Box<dyn Fn() -> Result<Vec<f32>, String> + 'a>;

/// One tensor of a file, under the name the importer looks it up by.
pub(crate) struct Entry<'a> {
    pub shape: Vec<usize>,
    /// The tensor's own name in the file; differs from the key for ONNX
    /// weights named after the node that consumes them.
    pub origin: String,
    /// The file's tensors this entry is read from (more than its origin when
    /// it is pieced together, as an ONNX position table can be).
    pub sources: Vec<String>,
    /// Whether the report should list the tensor when it goes unused
    /// (initializers yes, ONNX graph constants no).
    pub listed: bool,
    pub load: Loader<'a>,
}

pub(crate) type Entries<'a> = BTreeMap<String, Entry<'a>>;

/// What the file says besides its tensors.
#[derive(Default)]
pub(crate) struct Hints {
    /// The config infl8 stored with the weights ([`super::VIT2D_METADATA_KEY`]).
    pub config: Option<VitConfig>,
    /// Heads, with where they were read.
    pub heads: Option<(usize, String)>,
    /// LayerNorm epsilon, with where it was read.
    pub eps: Option<(f64, String)>,
    pub notes: Vec<String>,
}

/// Element types the readers decode.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Elem {
    F32,
    F64,
    F16,
    Bf16,
}

/// Little-endian bytes to f32. Alignment-free because file buffers give no
/// alignment guarantee.
pub(crate) fn decode_le(bytes: &[u8], elem: Elem) -> Result<Vec<f32>, String> {
    let size = match elem {
        Elem::F32 => 4,
        Elem::F64 => 8,
        Elem::F16 | Elem::Bf16 => 2,
    };
    if !bytes.len().is_multiple_of(size) {
        return Err(format!(
            "{} bytes is not a whole number of {size}-byte elements",
            bytes.len()
        ));
    }
    Ok(match elem {
        Elem::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Elem::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        Elem::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Elem::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    })
}

const TIMM_ANCHOR: &str = "patch_embed.proj.weight";
const HF_ANCHOR: &str = "embeddings.patch_embeddings.projection.weight";

/// Prefix and naming of every patch embedding among `keys`.
pub(crate) fn anchors<'k>(keys: impl IntoIterator<Item = &'k str>) -> Vec<(String, Naming)> {
    let mut found = Vec::new();
    for key in keys {
        for (anchor, naming) in [(TIMM_ANCHOR, Naming::Timm), (HF_ANCHOR, Naming::Hf)] {
            if let Some(prefix) = key.strip_suffix(anchor)
                && (prefix.is_empty() || prefix.ends_with('.'))
            {
                found.push((prefix.to_owned(), naming));
            }
        }
    }
    found
}

/// Name of the final LayerNorm's bias of a backbone.
pub(crate) fn final_norm_bias(prefix: &str, naming: Naming) -> String {
    match naming {
        Naming::Timm => format!("{prefix}norm.bias"),
        Naming::Hf => format!("{prefix}layernorm.bias"),
    }
}

/// Finds the patch embedding of the backbone: its name gives the naming
/// scheme and the prefix wrapping the backbone (`module.`, `backbone.`,
/// `model.`, `vit.`, `dinov2.`, ...), whatever the wrapper was.
pub(crate) fn find_backbone(
    path: &Path,
    entries: &Entries,
    opts: &ImportOptions,
) -> Result<(String, Naming, Vec<String>), ImportError> {
    let found = anchors(entries.keys().map(String::as_str));
    let prefixes = || {
        found
            .iter()
            .map(|(p, _)| format!("`{p}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(want) = &opts.prefix {
        let want = if want.is_empty() || want.ends_with('.') {
            want.clone()
        } else {
            format!("{want}.")
        };
        return match found.iter().find(|(p, _)| *p == want) {
            Some((p, n)) => Ok((p.clone(), *n, Vec::new())),
            None => Err(ImportError::NotAVit {
                path: path.to_path_buf(),
                message: format!(
                    "no patch embedding under the prefix `{want}` (backbones found under: {})",
                    if found.is_empty() {
                        "none".to_owned()
                    } else {
                        prefixes()
                    }
                ),
            }),
        };
    }
    let Some(shortest) = found.iter().map(|(p, _)| p.len()).min() else {
        let sample: Vec<String> = entries
            .iter()
            .filter(|(_, e)| e.listed)
            .map(|(k, _)| k.clone())
            .take(6)
            .collect();
        return Err(ImportError::NotAVit {
            path: path.to_path_buf(),
            message: format!(
                "no patch embedding tensor (`{TIMM_ANCHOR}` or `{HF_ANCHOR}`, possibly under a \
                 prefix) among its {} tensors{}",
                entries.values().filter(|e| e.listed).count(),
                if sample.is_empty() {
                    String::new()
                } else {
                    format!(" ({}, ...)", sample.join(", "))
                }
            ),
        });
    };
    let best: Vec<&(String, Naming)> = found.iter().filter(|(p, _)| p.len() == shortest).collect();
    if best.len() > 1 {
        return Err(ImportError::Config {
            path: path.to_path_buf(),
            message: format!(
                "the file holds several backbones (under {}); choose one with the prefix option",
                prefixes()
            ),
        });
    }
    let (prefix, naming) = best[0].clone();
    let mut notes = Vec::new();
    if found.len() > 1 {
        notes.push(format!(
            "took the backbone under `{prefix}`; the file has others (under {})",
            prefixes()
        ));
    }
    Ok((prefix, naming, notes))
}

/// Names of one block's tensors, without the block prefix. Several
/// candidates: the first present is taken.
struct BlockNames {
    norm1: &'static [&'static str],
    norm2: &'static [&'static str],
    proj: &'static str,
    fc1: &'static [&'static str],
    fc2: &'static [&'static str],
    ls1: &'static [&'static str],
    ls2: &'static [&'static str],
}

const TIMM_BLOCK: BlockNames = BlockNames {
    norm1: &["norm1"],
    norm2: &["norm2"],
    proj: "attn.proj",
    fc1: &["mlp.fc1"],
    fc2: &["mlp.fc2"],
    ls1: &["ls1.gamma", "ls1.weight"],
    ls2: &["ls2.gamma", "ls2.weight"],
};

const HF_BLOCK: BlockNames = BlockNames {
    norm1: &["norm1", "layernorm_before"],
    norm2: &["norm2", "layernorm_after"],
    proj: "attention.output.dense",
    fc1: &["mlp.fc1", "intermediate.dense"],
    fc2: &["mlp.fc2", "output.dense"],
    ls1: &["layer_scale1.lambda1"],
    ls2: &["layer_scale2.lambda1"],
};

/// Tensors that sit beside a backbone without being part of it, but change
/// what it computes: dropping them silently would give a different model.
const UNSUPPORTED_ROOT: &[&str] = &["norm_pre.", "patch_embed.norm.", "embeddings.norm."];

/// Register tokens join the sequence in the original model; the backbone is
/// imported without them, which the report says.
const REGISTER_TOKENS: &[&str] = &["reg_token", "register_tokens", "embeddings.register_tokens"];

/// Looks tensors up by their name inside the backbone, checks shapes, and
/// keeps account of what was used and what is missing.
struct Ctx<'e, 'a> {
    path: &'e Path,
    prefix: &'e str,
    /// Name inside the backbone (chunked block names flattened) -> entry.
    local: BTreeMap<String, &'e Entry<'a>>,
    used: Vec<String>,
    used_set: BTreeSet<String>,
    missing: Vec<String>,
    defaulted: Vec<String>,
}

impl<'e, 'a> Ctx<'e, 'a> {
    fn full(&self, local: &str) -> String {
        format!("{}{local}", self.prefix)
    }

    fn pick(&self, candidates: &[String]) -> Option<String> {
        candidates
            .iter()
            .find(|c| self.local.contains_key(c.as_str()))
            .cloned()
    }

    fn has(&self, name: &str) -> bool {
        self.local.contains_key(name)
    }

    fn shape_of(&self, name: &str) -> Option<&'e [usize]> {
        self.local.get(name).map(|e| e.shape.as_slice())
    }

    fn shape_error(&self, name: &str, expected: String, found: &[usize]) -> ImportError {
        ImportError::Shape {
            path: self.path.to_path_buf(),
            tensor: self.full(name),
            expected,
            found: found.to_vec(),
        }
    }

    /// Values of `name`, whose shape must equal `expected` once leading unit
    /// dimensions are dropped on both sides (`[1, 1, C]` cls tokens vs `[C]`).
    fn read(&mut self, name: &str, expected: &[usize]) -> Result<Vec<f32>, ImportError> {
        let entry = *self.local.get(name).ok_or_else(|| ImportError::Missing {
            path: self.path.to_path_buf(),
            tensors: vec![self.full(name)],
        })?;
        let trim = |s: &[usize]| -> Vec<usize> {
            let first = s.iter().position(|&d| d != 1).unwrap_or(s.len());
            s[first..].to_vec()
        };
        if trim(&entry.shape) != trim(expected) {
            return Err(self.shape_error(name, format!("{expected:?}"), &entry.shape));
        }
        self.read_raw(name)
    }

    /// Values of `name` whatever its shape (the caller checks it).
    fn read_raw(&mut self, name: &str) -> Result<Vec<f32>, ImportError> {
        let entry = *self.local.get(name).ok_or_else(|| ImportError::Missing {
            path: self.path.to_path_buf(),
            tensors: vec![self.full(name)],
        })?;
        let data = (entry.load)().map_err(|message| ImportError::Tensor {
            path: self.path.to_path_buf(),
            tensor: self.full(name),
            message,
        })?;
        let want: usize = entry.shape.iter().product();
        if data.len() != want {
            return Err(ImportError::Tensor {
                path: self.path.to_path_buf(),
                tensor: self.full(name),
                message: format!(
                    "holds {} values, its shape {:?} needs {want}",
                    data.len(),
                    entry.shape
                ),
            });
        }
        if self.used_set.insert(name.to_owned()) {
            self.used.push(name.to_owned());
        }
        Ok(data)
    }

    /// A tensor the backbone cannot do without: when absent it is recorded
    /// (all are reported at once) and zeros stand in.
    fn required(
        &mut self,
        candidates: &[String],
        expected: &[usize],
    ) -> Result<Vec<f32>, ImportError> {
        match self.pick(candidates) {
            Some(name) => self.read(&name, expected),
            None => {
                let mut shown = self.full(&candidates[0]);
                if candidates.len() > 1 {
                    shown.push_str(&format!(" (or {})", candidates[1..].join(", ")));
                }
                self.missing.push(shown);
                Ok(vec![0.0; expected.iter().product()])
            }
        }
    }

    /// A tensor with a neutral default (biases): `None` when absent.
    fn optional(
        &mut self,
        candidates: &[String],
        expected: &[usize],
    ) -> Result<Option<Vec<f32>>, ImportError> {
        match self.pick(candidates) {
            Some(name) => self.read(&name, expected).map(Some),
            None => {
                self.defaulted.push(self.full(&candidates[0]));
                Ok(None)
            }
        }
    }
}

fn arr1(v: Vec<f32>) -> Array1<f32> {
    Array1::from_vec(v)
}

fn arr2(v: Vec<f32>, rows: usize, cols: usize) -> Result<Array2<f32>, String> {
    Array2::from_shape_vec((rows, cols), v).map_err(|e| e.to_string())
}

fn isqrt_exact(n: usize) -> Option<usize> {
    let r = (n as f64).sqrt().round() as usize;
    (r * r == n && n > 0).then_some(r)
}

/// Groups the backbone's tensors by name inside it, flattening chunked block
/// names (DINOv2's `blocks.<chunk>.<index>.`).
fn localise<'e, 'a>(
    entries: &'e Entries<'a>,
    prefix: &str,
    naming: Naming,
) -> BTreeMap<String, &'e Entry<'a>> {
    let mut local = BTreeMap::new();
    for (key, entry) in entries {
        let Some(name) = key.strip_prefix(prefix) else {
            continue;
        };
        let mut name = name.to_owned();
        if naming == Naming::Timm
            && let Some(rest) = name.strip_prefix("blocks.")
        {
            let parts: Vec<&str> = rest.splitn(3, '.').collect();
            if parts.len() == 3
                && parts[0].parse::<usize>().is_ok()
                && parts[1].parse::<usize>().is_ok()
            {
                name = format!("blocks.{}.{}", parts[1], parts[2]);
            }
        }
        local.insert(name, entry);
    }
    local
}

/// Block index of a name inside the backbone, with the rest of the name.
fn block_of(name: &str, naming: Naming) -> Option<(usize, &str)> {
    let rest = match naming {
        Naming::Timm => name.strip_prefix("blocks.")?,
        Naming::Hf => name.strip_prefix("encoder.layer.")?,
    };
    let (idx, tail) = rest.split_once('.')?;
    Some((idx.parse().ok()?, tail))
}

/// Builds the backbone from a file's tensors.
pub(crate) fn assemble(
    path: &Path,
    format: SourceFormat,
    entries: &Entries,
    mut hints: Hints,
    opts: &ImportOptions,
) -> Result<(Vit2d, ImportReport), ImportError> {
    let (prefix, naming, mut notes) = find_backbone(path, entries, opts)?;
    notes.append(&mut hints.notes);
    let mut ctx = Ctx {
        path,
        prefix: &prefix,
        local: localise(entries, &prefix, naming),
        used: Vec::new(),
        used_set: BTreeSet::new(),
        missing: Vec::new(),
        defaulted: Vec::new(),
    };
    let s = |v: &str| vec![v.to_owned()];

    // Patch embedding: gives width, input channels and patch size.
    let (patch_name, bias_name, cls_name, pos_name, norm_name, block_prefix, names) = match naming {
        Naming::Timm => (
            TIMM_ANCHOR,
            "patch_embed.proj.bias",
            "cls_token",
            "pos_embed",
            "norm",
            "blocks",
            &TIMM_BLOCK,
        ),
        Naming::Hf => (
            HF_ANCHOR,
            "embeddings.patch_embeddings.projection.bias",
            "embeddings.cls_token",
            "embeddings.position_embeddings",
            "layernorm",
            "encoder.layer",
            &HF_BLOCK,
        ),
    };
    let pshape = ctx.shape_of(patch_name).unwrap_or(&[]).to_vec();
    let [width, in_chans, patch, patch_w] = pshape[..] else {
        return Err(ctx.shape_error(patch_name, "[C, in_chans, P, P]".into(), &pshape));
    };
    if patch != patch_w || patch == 0 || width == 0 || in_chans == 0 {
        return Err(ImportError::Unsupported {
            path: path.to_path_buf(),
            message: format!(
                "patch embedding {} has shape {pshape:?}: only non-empty square patches are \
                 supported",
                ctx.full(patch_name)
            ),
        });
    }
    let c = width;
    let patch_w_data = ctx.read(patch_name, &pshape)?;
    let patch_w_arr = Array4::from_shape_vec((c, in_chans, patch, patch), patch_w_data)
        .map_err(|e| ctx.shape_error(patch_name, e.to_string(), &pshape))?;
    let patch_b = ctx
        .optional(&s(bias_name), &[c])?
        .map(arr1)
        .unwrap_or_else(|| Array1::zeros(c));

    // Cls token and position table.
    let cls = if ctx.has(cls_name) {
        Some(arr1(ctx.read(cls_name, &[c])?))
    } else {
        None
    };
    let pos_raw = if ctx.has(pos_name) {
        let shape = ctx.shape_of(pos_name).unwrap_or(&[]).to_vec();
        let tokens = match shape[..] {
            [1, t, w] | [t, w] if w == c => t,
            _ => return Err(ctx.shape_error(pos_name, format!("[1, T, {c}]"), &shape)),
        };
        Some((tokens, ctx.read_raw(pos_name)?))
    } else {
        ctx.missing.push(ctx.full(pos_name));
        None
    };

    // Blocks.
    let mut depth = 0;
    for name in ctx.local.keys() {
        if let Some((i, _)) = block_of(name, naming) {
            depth = depth.max(i + 1);
        }
    }
    let present: BTreeSet<usize> = ctx
        .local
        .keys()
        .filter_map(|n| block_of(n, naming).map(|(i, _)| i))
        .collect();
    if let Some(gap) = (0..depth).find(|i| !present.contains(i)) {
        return Err(ImportError::Missing {
            path: path.to_path_buf(),
            tensors: vec![format!(
                "{}{block_prefix}.{gap}.* (the file has blocks up to {})",
                prefix,
                depth - 1
            )],
        });
    }
    if depth == 0 {
        ctx.missing.push(format!(
            "{prefix}{block_prefix}.0.* (no transformer blocks)"
        ));
    }
    let bname = |i: usize, rest: &str| format!("{block_prefix}.{i}.{rest}");
    let cands = |i: usize, list: &[&str], suffix: &str| -> Vec<String> {
        list.iter()
            .map(|n| {
                if suffix.is_empty() {
                    bname(i, n)
                } else {
                    bname(i, &format!("{n}.{suffix}"))
                }
            })
            .collect()
    };
    // MLP width from the first fc1 present.
    let mlp = (0..depth)
        .find_map(|i| {
            ctx.pick(&cands(i, names.fc1, "weight"))
                .and_then(|n| ctx.shape_of(&n))
                .and_then(|s| match s {
                    [m, w] if *w == c => Some(*m),
                    _ => None,
                })
        })
        .unwrap_or(0);
    let layer_scale = (0..depth).any(|i| {
        ctx.pick(&cands(i, names.ls1, "")).is_some() || ctx.pick(&cands(i, names.ls2, "")).is_some()
    });
    let mut norm1_is_hf_vit = false;

    let mut blocks = Vec::with_capacity(depth);
    for i in 0..depth {
        if i == 0 && naming == Naming::Hf {
            norm1_is_hf_vit = ctx.has(&bname(0, "layernorm_before.weight"));
        }
        let norm1_w = arr1(ctx.required(&cands(i, names.norm1, "weight"), &[c])?);
        let norm1_b = arr1(ctx.required(&cands(i, names.norm1, "bias"), &[c])?);
        let (qkv_w, qkv_b) = match naming {
            Naming::Timm => {
                let w = ctx.required(&s(&bname(i, "attn.qkv.weight")), &[3 * c, c])?;
                let b = if ctx.has(&bname(i, "attn.qkv.bias")) {
                    ctx.read(&bname(i, "attn.qkv.bias"), &[3 * c])?
                } else if ctx.has(&bname(i, "attn.q_bias")) || ctx.has(&bname(i, "attn.v_bias")) {
                    // BEiT-style split bias: k has none by construction.
                    let q = ctx.optional(&s(&bname(i, "attn.q_bias")), &[c])?;
                    let v = ctx.optional(&s(&bname(i, "attn.v_bias")), &[c])?;
                    let mut b = q.unwrap_or_else(|| vec![0.0; c]);
                    b.extend(std::iter::repeat_n(0.0, c));
                    b.extend(v.unwrap_or_else(|| vec![0.0; c]));
                    b
                } else {
                    ctx.defaulted.push(ctx.full(&bname(i, "attn.qkv.bias")));
                    vec![0.0; 3 * c]
                };
                (
                    arr2(w, 3 * c, c)
                        .map_err(|e| ctx.shape_error(&bname(i, "attn.qkv.weight"), e, &[]))?,
                    arr1(b),
                )
            }
            Naming::Hf => {
                let mut w = Vec::with_capacity(3 * c * c);
                let mut b = Vec::with_capacity(3 * c);
                for part in ["query", "key", "value"] {
                    let base = format!("attention.attention.{part}");
                    w.extend(ctx.required(&s(&bname(i, &format!("{base}.weight"))), &[c, c])?);
                    b.extend(
                        ctx.optional(&s(&bname(i, &format!("{base}.bias"))), &[c])?
                            .unwrap_or_else(|| vec![0.0; c]),
                    );
                }
                (
                    arr2(w, 3 * c, c)
                        .map_err(|e| ctx.shape_error(&bname(i, "attention"), e, &[]))?,
                    arr1(b),
                )
            }
        };
        let proj_w = ctx.required(&s(&bname(i, &format!("{}.weight", names.proj))), &[c, c])?;
        let proj_b = ctx
            .optional(&s(&bname(i, &format!("{}.bias", names.proj))), &[c])?
            .unwrap_or_else(|| vec![0.0; c]);
        let norm2_w = arr1(ctx.required(&cands(i, names.norm2, "weight"), &[c])?);
        let norm2_b = arr1(ctx.required(&cands(i, names.norm2, "bias"), &[c])?);
        let fc1_w = ctx.required(&cands(i, names.fc1, "weight"), &[mlp, c])?;
        let fc1_b = ctx
            .optional(&cands(i, names.fc1, "bias"), &[mlp])?
            .unwrap_or_else(|| vec![0.0; mlp]);
        let fc2_w = ctx.required(&cands(i, names.fc2, "weight"), &[c, mlp])?;
        let fc2_b = ctx
            .optional(&cands(i, names.fc2, "bias"), &[c])?
            .unwrap_or_else(|| vec![0.0; c]);
        let (ls1, ls2) = if layer_scale {
            (
                Some(arr1(ctx.required(&cands(i, names.ls1, ""), &[c])?)),
                Some(arr1(ctx.required(&cands(i, names.ls2, ""), &[c])?)),
            )
        } else {
            (None, None)
        };
        let shape_err = |e: String| ImportError::Config {
            path: path.to_path_buf(),
            message: format!("block {i}: {e}"),
        };
        blocks.push(BlockWeights {
            norm1_w,
            norm1_b,
            qkv_w,
            qkv_b,
            proj_w: arr2(proj_w, c, c).map_err(shape_err)?,
            proj_b: arr1(proj_b),
            ls1,
            norm2_w,
            norm2_b,
            fc1_w: arr2(fc1_w, mlp, c).map_err(shape_err)?,
            fc1_b: arr1(fc1_b),
            fc2_w: arr2(fc2_w, c, mlp).map_err(shape_err)?,
            fc2_b: arr1(fc2_b),
            ls2,
        });
    }
    let norm_w = arr1(ctx.required(&s(&format!("{norm_name}.weight")), &[c])?);
    let norm_b = arr1(ctx.required(&s(&format!("{norm_name}.bias")), &[c])?);

    // What is left: block tensors this importer does not understand change
    // the computation, so they are an error; the rest is not the backbone.
    let mut unsupported: Vec<String> = Vec::new();
    let mut registers = false;
    for name in ctx.local.keys() {
        if ctx.used_set.contains(name) {
            continue;
        }
        if block_of(name, naming).is_some() || UNSUPPORTED_ROOT.iter().any(|p| name.starts_with(p))
        {
            unsupported.push(ctx.full(name));
        }
        if REGISTER_TOKENS.contains(&name.as_str()) {
            registers = true;
        }
    }
    if !unsupported.is_empty() {
        return Err(ImportError::Unsupported {
            path: path.to_path_buf(),
            message: format!(
                "tensors of a ViT variant this importer does not handle (it reads plain pre-norm \
                 blocks: LayerNorm, fused or split qkv attention, GELU MLP, optional layer \
                 scale): {}",
                super::list(&unsupported)
            ),
        });
    }
    if !ctx.missing.is_empty() {
        return Err(ImportError::Missing {
            path: path.to_path_buf(),
            tensors: ctx.missing,
        });
    }
    if registers {
        notes.push(
            "register tokens ignored: the backbone runs without them, so its outputs differ \
             from the original model's"
                .into(),
        );
    }

    // Grid from the position table, cls entry included or not.
    let meta = hints.config.take();
    let Some((tokens, pos_data)) = pos_raw else {
        return Err(ImportError::Missing {
            path: path.to_path_buf(),
            tensors: vec![ctx.full(pos_name)],
        });
    };
    let meta_grid = meta.as_ref().map(|m| m.grid);
    let fits = |n: usize| meta_grid.filter(|g| g[0] * g[1] == n);
    let cls_token = cls.is_some();
    let (grid, pos) = if cls_token {
        let with_cls = tokens
            .checked_sub(1)
            .and_then(|n| fits(n).or_else(|| isqrt_exact(n).map(|s| [s, s])));
        if let Some(grid) = with_cls {
            (grid, arr2(pos_data, tokens, c))
        } else if let Some(grid) = fits(tokens).or_else(|| isqrt_exact(tokens).map(|s| [s, s])) {
            // timm `no_embed_class`: the cls token gets no position; a zero
            // row is the same computation in the layout Vit2d uses.
            notes.push(format!(
                "{} has no cls entry (no_embed_class); a zero row was added for it",
                ctx.full(pos_name)
            ));
            let mut data = vec![0.0; c];
            data.extend(pos_data);
            (grid, arr2(data, tokens + 1, c))
        } else {
            return Err(non_square(path, &ctx.full(pos_name), tokens, true));
        }
    } else {
        let grid = fits(tokens)
            .or_else(|| isqrt_exact(tokens).map(|s| [s, s]))
            .ok_or_else(|| non_square(path, &ctx.full(pos_name), tokens, false))?;
        (grid, arr2(pos_data, tokens, c))
    };
    let pos = pos.map_err(|e| ctx.shape_error(pos_name, e, &[]))?;

    // Heads and eps: nothing in the tensors says them.
    let (heads, heads_from) = if let Some(h) = opts.heads {
        (h, "given".to_owned())
    } else if let Some(m) = &meta {
        (m.heads, format!("{} metadata", super::VIT2D_METADATA_KEY))
    } else if let Some((h, from)) = hints.heads.take() {
        (h, from)
    } else if c.is_multiple_of(64) {
        (
            c / 64,
            format!(
                "assumed: width {c} / 64 as in ViT-S/B/L/g; give the heads if this model differs"
            ),
        )
    } else {
        return Err(ImportError::Config {
            path: path.to_path_buf(),
            message: format!(
                "cannot tell the number of attention heads of width {c} (not a multiple of 64); \
                 give it explicitly"
            ),
        });
    };
    if heads == 0 || !c.is_multiple_of(heads) {
        return Err(ImportError::Config {
            path: path.to_path_buf(),
            message: format!("{heads} heads ({heads_from}) do not divide the width {c}"),
        });
    }
    notes.push(format!("heads {heads}: {heads_from}"));
    let (eps, eps_from) = if let Some(e) = opts.eps {
        (e, "given".to_owned())
    } else if let Some(m) = &meta {
        (m.eps, format!("{} metadata", super::VIT2D_METADATA_KEY))
    } else if let Some((e, from)) = hints.eps.take() {
        (e, from)
    } else if norm1_is_hf_vit {
        (1e-12, "assumed: the HF ViTModel default".to_owned())
    } else {
        (1e-6, "assumed: the timm/DINOv2 default".to_owned())
    };
    if !(eps > 0.0 && eps.is_finite()) {
        return Err(ImportError::Config {
            path: path.to_path_buf(),
            message: format!("LayerNorm epsilon {eps} ({eps_from}) must be positive"),
        });
    }
    notes.push(format!("eps {eps:e}: {eps_from}"));

    let config = VitConfig {
        patch,
        width: c,
        depth,
        heads,
        mlp,
        in_chans,
        grid,
        cls_token,
        layer_scale,
        eps,
    };
    if let Some(m) = &meta
        && *m != config
    {
        return Err(ImportError::Config {
            path: path.to_path_buf(),
            message: format!(
                "the {} metadata does not match the weights: metadata {m:?}, weights {config:?}",
                super::VIT2D_METADATA_KEY
            ),
        });
    }
    let vit = Vit2d {
        config: config.clone(),
        patch_w: patch_w_arr,
        patch_b,
        cls,
        pos,
        blocks,
        norm_w,
        norm_b,
    };
    validate(&vit).map_err(|message| ImportError::Config {
        path: path.to_path_buf(),
        message,
    })?;

    let used_sources: BTreeSet<&str> = ctx
        .used
        .iter()
        .filter_map(|n| ctx.local.get(n))
        .flat_map(|e| e.sources.iter().map(String::as_str))
        .collect();
    let loaded: Vec<String> = ctx
        .used
        .iter()
        .map(|n| {
            let full = ctx.full(n);
            match ctx.local.get(n) {
                Some(e) if e.origin != full => format!("{full} (from {})", e.origin),
                _ => full,
            }
        })
        .collect();
    let ignored: Vec<String> = entries
        .values()
        .filter(|e| e.listed && !used_sources.contains(e.origin.as_str()))
        .map(|e| e.origin.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let report = ImportReport {
        source: path.to_path_buf(),
        format,
        naming,
        prefix: prefix.clone(),
        config,
        loaded,
        missing: ctx.defaulted,
        ignored,
        notes,
    };
    tracing::debug!(report = %report, "ViT imported");
    Ok((vit, report))
}

fn non_square(path: &Path, name: &str, tokens: usize, cls: bool) -> ImportError {
    ImportError::Config {
        path: path.to_path_buf(),
        message: format!(
            "position table {name} has {tokens} tokens, which is not {}a square grid; \
             non-square grids need the {} metadata",
            if cls { "a cls entry plus " } else { "" },
            super::VIT2D_METADATA_KEY
        ),
    }
}

/// Checks that every array of `vit` has the shape its config implies.
pub fn validate(vit: &Vit2d) -> Result<(), String> {
    let cfg = &vit.config;
    let c = cfg.width;
    let mut errs: Vec<String> = Vec::new();
    fn check(errs: &mut Vec<String>, what: String, found: &[usize], want: &[usize]) {
        if found != want {
            errs.push(format!("{what} is {found:?}, expected {want:?}"));
        }
    }
    let e = &mut errs;
    if cfg.heads == 0 || !c.is_multiple_of(cfg.heads) {
        return Err(format!("{} heads do not divide the width {c}", cfg.heads));
    }
    check(
        e,
        "patch_w".into(),
        vit.patch_w.shape(),
        &[c, cfg.in_chans, cfg.patch, cfg.patch],
    );
    check(e, "patch_b".into(), vit.patch_b.shape(), &[c]);
    match (&vit.cls, cfg.cls_token) {
        (Some(cls), true) => check(e, "cls".into(), cls.shape(), &[c]),
        (None, false) => {}
        (cls, want) => e.push(format!(
            "cls token {} but config.cls_token is {want}",
            if cls.is_some() { "present" } else { "absent" }
        )),
    }
    let tokens = usize::from(cfg.cls_token) + cfg.grid[0] * cfg.grid[1];
    check(e, "pos".into(), vit.pos.shape(), &[tokens, c]);
    if vit.blocks.len() != cfg.depth {
        e.push(format!(
            "{} blocks but config.depth is {}",
            vit.blocks.len(),
            cfg.depth
        ));
    }
    for (i, b) in vit.blocks.iter().enumerate() {
        let m = cfg.mlp;
        check(e, format!("block {i} norm1_w"), b.norm1_w.shape(), &[c]);
        check(e, format!("block {i} norm1_b"), b.norm1_b.shape(), &[c]);
        check(e, format!("block {i} qkv_w"), b.qkv_w.shape(), &[3 * c, c]);
        check(e, format!("block {i} qkv_b"), b.qkv_b.shape(), &[3 * c]);
        check(e, format!("block {i} proj_w"), b.proj_w.shape(), &[c, c]);
        check(e, format!("block {i} proj_b"), b.proj_b.shape(), &[c]);
        check(e, format!("block {i} norm2_w"), b.norm2_w.shape(), &[c]);
        check(e, format!("block {i} norm2_b"), b.norm2_b.shape(), &[c]);
        check(e, format!("block {i} fc1_w"), b.fc1_w.shape(), &[m, c]);
        check(e, format!("block {i} fc1_b"), b.fc1_b.shape(), &[m]);
        check(e, format!("block {i} fc2_w"), b.fc2_w.shape(), &[c, m]);
        check(e, format!("block {i} fc2_b"), b.fc2_b.shape(), &[c]);
        for (what, ls) in [("ls1", &b.ls1), ("ls2", &b.ls2)] {
            match (ls, cfg.layer_scale) {
                (Some(v), true) => check(e, format!("block {i} {what}"), v.shape(), &[c]),
                (None, false) => {}
                (v, want) => e.push(format!(
                    "block {i} {what} {} but config.layer_scale is {want}",
                    if v.is_some() { "present" } else { "absent" }
                )),
            }
        }
    }
    check(e, "norm_w".into(), vit.norm_w.shape(), &[c]);
    check(e, "norm_b".into(), vit.norm_b.shape(), &[c]);
    if errs.is_empty() {
        Ok(())
    } else {
        Err(format!("inconsistent ViT: {}", errs.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_float_width() {
        let f32s: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(decode_le(&f32s, Elem::F32).unwrap(), [1.5, -2.0]);
        let f64s: Vec<u8> = [0.25f64].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(decode_le(&f64s, Elem::F64).unwrap(), [0.25]);
        let f16 = half::f16::from_f32(-0.5).to_le_bytes();
        assert_eq!(decode_le(&f16, Elem::F16).unwrap(), [-0.5]);
        let bf16 = half::bf16::from_f32(3.0).to_le_bytes();
        assert_eq!(decode_le(&bf16, Elem::Bf16).unwrap(), [3.0]);
        assert!(decode_le(&[0, 0, 0], Elem::F32).is_err());
    }

    #[test]
    fn anchors_need_a_dot_boundary() {
        let found = anchors([
            "module.patch_embed.proj.weight",
            "xpatch_embed.proj.weight",
            "vit.embeddings.patch_embeddings.projection.weight",
        ]);
        assert_eq!(
            found,
            [
                ("module.".to_owned(), Naming::Timm),
                ("vit.".to_owned(), Naming::Hf)
            ]
        );
    }

    #[test]
    fn block_names_parse() {
        assert_eq!(
            block_of("blocks.11.attn.qkv.weight", Naming::Timm),
            Some((11, "attn.qkv.weight"))
        );
        assert_eq!(
            block_of("encoder.layer.3.norm1.bias", Naming::Hf),
            Some((3, "norm1.bias"))
        );
        assert_eq!(block_of("blocks.x.norm1.bias", Naming::Timm), None);
        assert_eq!(block_of("norm.weight", Naming::Timm), None);
    }
}
