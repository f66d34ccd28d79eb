//! One entry point per `cargo fuzz` target (`fuzz/fuzz_targets/`), shared
//! with the corpus replay test (`core/tests/fuzz_corpus.rs`) so the fuzzed
//! code and the regression-tested code cannot drift apart.
//!
//! Each function takes the fuzzer's raw bytes and runs them through the same
//! functions the runtime uses on untrusted input. Errors are expected and
//! ignored; a panic (including a failed `assert!` on an invariant below), a
//! hang or a huge allocation is a bug. See `docs/fuzzing.md`.

use std::ffi::CString;
use std::io::Write;
use std::path::Path;

use arbitrary::Unstructured;

use crate::backend::{Dim, ForeignBuffer, Tensor, TensorInfo};
use crate::manifest::{self, Manifest};
use crate::nifti_io::{self, NiftiIoError, NonFinite, ReadLimits};
use crate::plugin::abi::{
    INFL8_DIM_SYMBOLIC, INFL8_MAX_RANK, Infl8TensorDesc, Infl8TensorOut, read_message,
};
use crate::preprocess::Reorientation;

/// Tensors at most this long are actually allocated when a check passes.
const ALLOC_CAP: usize = 1 << 16;

/// Bytes as a `.nii` file, then gzip-compressed as a `.nii.gz` file (bytes
/// that are already gzip take the `.nii.gz` path the first time), through
/// [`nifti_io::read_volume_bytes`], the reader behind `read_volume`, with
/// the limits of the shipped CPU profile.
pub fn nifti_read(data: &[u8]) {
    read_nifti(Path::new("fuzz.nii"), data);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    if gz.write_all(data).is_ok()
        && let Ok(gz) = gz.finish()
    {
        read_nifti(Path::new("fuzz.nii.gz"), &gz);
    }
}

fn read_nifti(name: &Path, bytes: &[u8]) {
    let mut limits = ReadLimits {
        max_voxels: 512 * 512 * 512,
        allow_nonfinite: NonFinite::Reject,
        max_input_bytes: 1 << 30,
        memory_budget_bytes: 4 << 30,
    };
    let mut result = nifti_io::read_volume_bytes(name, bytes, &limits);
    if let Err(NiftiIoError::NonFinite { .. }) = result {
        limits.allow_nonfinite = NonFinite::Zero;
        result = nifti_io::read_volume_bytes(name, bytes, &limits);
    }
    let Ok(vol) = result else { return };
    // What segmentation does first with what the header declared.
    assert!(vol.spacing.iter().all(|s| s.is_finite() && *s > 0.0));
    if limits.allow_nonfinite == NonFinite::Zero {
        assert!(vol.data.iter().all(|v| v.is_finite()));
    }
    let r = Reorientation::to_ras(&vol.affine, vol.dims());
    let ras = r.apply_view(vol.data.view());
    let _ = r.apply_affine(&vol.affine);
    assert_eq!(ras.len(), vol.data.len());
}

/// Bytes as a manifest: JSON (a sidecar `MODEL.onnx.json`, or the text of
/// the `infl8.manifest` metadata entry), and as an ONNX model whose
/// metadata is read ([`manifest::from_metadata`]) and checked against the
/// model's declared I/O ([`manifest::check_model_fits`]).
pub fn manifest_parse(data: &[u8]) {
    if let Ok(json) = std::str::from_utf8(data) {
        manifest_json(json);
    }
    let path = Path::new("fuzz.onnx");
    let Ok(model) = infl8_onnx::decode(data, path) else {
        return;
    };
    let info = |t: Option<infl8_onnx::DeclaredTensor>, default: &str| {
        let t = t.unwrap_or(infl8_onnx::DeclaredTensor {
            name: default.into(),
            elem_type: 0,
            shape: None,
        });
        let shape = t
            .shape
            .unwrap_or_default()
            .into_iter()
            .map(|d| match d {
                infl8_onnx::DeclaredDim::Fixed(n) => usize::try_from(n)
                    .ok()
                    .filter(|&n| n > 0)
                    .map_or_else(|| Dim::Symbolic(n.to_string()), Dim::Fixed),
                infl8_onnx::DeclaredDim::Symbolic(s) => Dim::Symbolic(s),
                infl8_onnx::DeclaredDim::Unknown => Dim::Symbolic("?".into()),
            })
            .collect();
        TensorInfo {
            name: t.name,
            shape,
        }
    };
    let input = info(infl8_onnx::inputs(&model).into_iter().next(), "input");
    let output = info(infl8_onnx::outputs(&model).into_iter().next(), "output");
    if let Ok(Some(m)) = manifest::from_metadata(&model, path) {
        let _ = manifest::check_model_fits(&m, path, &input, &output);
    }
}

fn manifest_json(json: &str) {
    let path = Path::new("fuzz.onnx.json");
    let Ok(m) = Manifest::from_json(json, path, "sidecar") else {
        return;
    };
    // What `infl8-train export` writes must read back as the same manifest.
    let again = Manifest::from_json(&m.to_json(), path, "sidecar");
    assert!(
        again.as_ref().is_ok_and(|a| *a == m),
        "manifest does not round-trip: {m:?} -> {} -> {again:?}",
        m.to_json()
    );
}

/// Bytes as a TOML settings file through [`crate::config::check_str`], the
/// same layering and validation as `infl8 config check`.
pub fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(s) = crate::config::check_str(Path::new("fuzz.toml"), text) else {
        return;
    };
    // Accepted settings must be usable as they are.
    assert!(!s.backend_chain().is_empty());
    for b in s.backend_chain() {
        let _ = s.load_options(&b);
    }
    let _ = s.limits.read_limits();
}

/// A plugin-facing exchange decoded from the bytes: the model I/O
/// descriptors a plugin reports (`tensor_info`), an input batch checked with
/// [`TensorInfo::check_run_input`] and [`Tensor::from_vec`], and the output
/// descriptor a plugin returns, validated as the host does before it trusts
/// the buffer (`check_run_output`) and wrapped with [`Tensor::from_foreign`].
pub fn tensor_check(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = exchange(&mut u);
}

fn exchange(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let names: Vec<u8> = u.arbitrary()?;
    let name = CString::new(names.into_iter().filter(|&b| b != 0).collect::<Vec<u8>>())
        .map_err(|_| arbitrary::Error::IncorrectFormat)?;
    let in_desc = desc(u, &name)?;
    let out_desc = desc(u, &name)?;
    let (Ok(input), Ok(output)) = (
        crate::plugin::tensor_info(&in_desc, "input"),
        crate::plugin::tensor_info(&out_desc, "output"),
    ) else {
        return Ok(());
    };
    assert!(input.rank() <= INFL8_MAX_RANK && output.rank() <= INFL8_MAX_RANK);
    let _ = input.to_string();

    let rank = u.int_in_range(0..=INFL8_MAX_RANK + 1)?;
    let shape = (0..rank)
        .map(|_| size(u).map(|d| d as usize))
        .collect::<arbitrary::Result<Vec<usize>>>()?;
    let product = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let len = match (u.arbitrary::<bool>()?, product) {
        (true, Some(n)) => n,
        _ => u.arbitrary()?,
    };
    if input.check_run_input(len, &shape).is_ok() {
        assert_eq!(product, Some(len));
        assert!(input.accepts(&shape));
        if len <= ALLOC_CAP {
            let t = Tensor::from_vec(shape.clone(), vec![0.0; len]);
            assert!(t.is_ok(), "check_run_input passed, from_vec refused");
        }
    }
    let _ = Tensor::from_vec(shape.clone(), vec![0.0; len.min(ALLOC_CAP)]);

    let out_rank = u.int_in_range(0..=INFL8_MAX_RANK as u32 + 2)?;
    let mut out_shape = [0u64; INFL8_MAX_RANK];
    for d in out_shape.iter_mut() {
        *d = size(u)?;
    }
    let declared = out_shape
        .get(..out_rank as usize)
        .and_then(|s| s.iter().try_fold(1u64, |a, &d| a.checked_mul(d)));
    let out_len = match (u.arbitrary::<bool>()?, declared) {
        (true, Some(n)) => n,
        _ => u.arbitrary()?,
    };
    // Only null-ness and alignment are looked at; nothing is read.
    let data_ptr: *const f32 = match u.int_in_range(0..=2u8)? {
        0 => std::ptr::null(),
        1 => std::ptr::dangling(),
        _ => std::ptr::dangling::<f32>()
            .cast::<u8>()
            .wrapping_add(1)
            .cast(),
    };
    let out = Infl8TensorOut {
        struct_size: size_of::<Infl8TensorOut>() as u32,
        rank: out_rank,
        shape: out_shape,
        data: data_ptr,
        len: out_len,
        owner: std::ptr::null_mut(),
    };
    if let Ok((s, n)) = crate::plugin::check_run_output(&out, &input, &output, &shape) {
        assert!(output.accepts(&s));
        assert_eq!(s.iter().try_fold(1usize, |a, &d| a.checked_mul(d)), Some(n));
        assert!(n == 0 || (!data_ptr.is_null() && data_ptr.is_aligned()));
        if n <= ALLOC_CAP {
            let t = Tensor::from_foreign(s, Box::new(Zeros(vec![0.0; n])));
            assert!(t.is_ok_and(|t| t.data().len() == n));
        }
    }

    let rest: &[u8] = u.bytes(u.len())?;
    let _ = read_message(rest);
    Ok(())
}

/// A descriptor as a plugin fills it: any rank (even past the maximum),
/// sizes that may be symbolic or negative.
fn desc(u: &mut Unstructured<'_>, name: &CString) -> arbitrary::Result<Infl8TensorDesc> {
    let rank = u.int_in_range(0..=INFL8_MAX_RANK as u32 + 2)?;
    let mut dims = [0i64; INFL8_MAX_RANK];
    for d in dims.iter_mut() {
        *d = match u.int_in_range(0..=7u8)? {
            0 => INFL8_DIM_SYMBOLIC,
            1 => u.arbitrary()?,
            _ => u.int_in_range(0..=16)?,
        };
    }
    Ok(Infl8TensorDesc {
        name: if u.arbitrary()? {
            name.as_ptr()
        } else {
            std::ptr::null()
        },
        rank,
        reserved: 0,
        dims,
    })
}

/// A size: mostly small (so products match and checks pass), sometimes
/// anything (so products overflow).
fn size(u: &mut Unstructured<'_>) -> arbitrary::Result<u64> {
    if u.int_in_range(0..=7u8)? == 0 {
        u.arbitrary()
    } else {
        u.int_in_range(0..=16)
    }
}

/// A plugin's buffer, as far as `Tensor::from_foreign` can tell.
struct Zeros(Vec<f32>);

impl ForeignBuffer for Zeros {
    fn as_slice(&self) -> &[f32] {
        &self.0
    }
}
