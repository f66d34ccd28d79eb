//! The calls through a plugin's function table, and the checks of what comes
//! back: the one raw client of the ABI. The host wraps it into safe
//! [`Backend`](crate::Backend)s; the conformance kit calls it directly,
//! because it needs the raw status codes and messages.
//!
//! Each call allocates the caller's side as the ABI asks (error buffer, out
//! structs with `struct_size` set) and turns the status into a [`Status`];
//! what a failure means is left to the caller.

use std::borrow::Cow;
use std::ffi::{CStr, c_char};
use std::ptr::{self, NonNull};

use super::abi::*;
use crate::backend::{Dim, TensorInfo};

/// Room for a plugin's error message; longer ones arrive truncated.
pub const ERR_CAP: usize = 4096;

/// A failed call: its status and the message the plugin wrote (may be
/// empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub code: i32,
    pub message: String,
}

impl Status {
    fn from_call(code: i32, err: &[u8]) -> Status {
        Status {
            code,
            message: if code == INFL8_OK {
                String::new()
            } else {
                read_message(err)
            },
        }
    }

    /// The message, or what to say when the plugin left it empty.
    pub fn text(&self) -> String {
        if self.message.is_empty() {
            format!(
                "the plugin reported {} without a message",
                status_name(self.code)
            )
        } else {
            self.message.clone()
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", status_name(self.code))?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

/// `model_load`: a new handle, or `None` if the plugin answered OK without
/// one.
///
/// # Safety
/// `load` must come from a live plugin table.
pub unsafe fn model_load(
    load: Infl8ModelLoadFn,
    backend_index: u32,
    model_path: &CStr,
    options_json: &CStr,
) -> Result<Option<NonNull<Infl8Model>>, Status> {
    let mut handle: *mut Infl8Model = ptr::null_mut();
    let mut err = [0u8; ERR_CAP];
    // SAFETY: the strings are NUL-terminated and outlive the call, the out
    // pointer and error buffer are writable.
    let code = unsafe {
        load(
            backend_index,
            model_path.as_ptr(),
            options_json.as_ptr(),
            &mut handle,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if code != INFL8_OK {
        return Err(Status::from_call(code, &err));
    }
    Ok(NonNull::new(handle))
}

/// `options_check` (ABI 1.2) of the backend at `backend_index`: its notes
/// (one per line, maybe none) when the options pass.
///
/// # Safety
/// `check` must come from a live plugin table.
pub unsafe fn options_check(
    check: Infl8OptionsCheckFn,
    backend_index: u32,
    options_json: &CStr,
) -> Result<Vec<String>, Status> {
    let mut err = [0u8; ERR_CAP];
    // SAFETY: the string is NUL-terminated and outlives the call, the error
    // buffer is writable.
    let code = unsafe {
        check(
            backend_index,
            options_json.as_ptr(),
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if code != INFL8_OK {
        return Err(Status::from_call(code, &err));
    }
    Ok(read_message(&err)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect())
}

/// `model_io` into `*out`, whose `struct_size` the caller has set.
///
/// # Safety
/// `io` must come from a live plugin table, `model` be a live handle of it,
/// and `out` be writable for `(*out).struct_size` bytes.
pub unsafe fn model_io(
    io: Infl8ModelIoFn,
    model: *const Infl8Model,
    out: *mut Infl8ModelIo,
) -> Result<(), Status> {
    let mut err = [0u8; ERR_CAP];
    // SAFETY: forwarded from the caller; the error buffer is writable.
    let code = unsafe { io(model, out, err.as_mut_ptr().cast(), err.len()) };
    if code != INFL8_OK {
        return Err(Status::from_call(code, &err));
    }
    Ok(())
}

/// An output descriptor to fill, sized as this host knows it.
pub fn empty_out() -> Infl8TensorOut {
    Infl8TensorOut {
        struct_size: size_of::<Infl8TensorOut>() as u32,
        rank: 0,
        shape: [0; INFL8_MAX_RANK],
        data: ptr::null(),
        len: 0,
        owner: ptr::null_mut(),
    }
}

/// `model_run` on `input` of `shape`. On success the output is the
/// caller's to check ([`check_output`]) and to release through
/// `tensor_free`; on failure there is nothing to release.
///
/// # Safety
/// `run` must come from a live plugin table and `model` be a live handle of
/// it; `input` must hold the values `shape` asks for, or be whatever
/// (deliberately bad) pointer the caller wants the plugin to refuse.
pub unsafe fn model_run(
    run: Infl8ModelRunFn,
    model: *const Infl8Model,
    input: *const f32,
    shape: &[u64],
) -> Result<Infl8TensorOut, Status> {
    let mut out = empty_out();
    let mut err = [0u8; ERR_CAP];
    // SAFETY: forwarded from the caller; `out` and `err` are writable.
    let code = unsafe {
        run(
            model,
            input,
            shape.as_ptr(),
            shape.len() as u32,
            &mut out,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if code != INFL8_OK {
        return Err(Status::from_call(code, &err));
    }
    Ok(out)
}

/// Text of a NUL-terminated string from a plugin; invalid UTF-8 replaced.
///
/// # Safety
/// `p` must be null or point to a NUL-terminated string.
pub(crate) unsafe fn lossy<'a>(p: *const c_char) -> Option<Cow<'a, str>> {
    if p.is_null() {
        None
    } else {
        // SAFETY: non-null and NUL-terminated by the caller's contract.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy())
    }
}

/// A descriptor as a [`TensorInfo`]. A symbolic first dimension is the batch
/// (`N`); other symbolic dimensions are unnamed in ABI 1 (`?`).
pub(crate) fn tensor_info(
    desc: &Infl8TensorDesc,
    default_name: &str,
) -> Result<TensorInfo, String> {
    let rank = desc.rank as usize;
    if rank > INFL8_MAX_RANK {
        return Err(format!("rank {rank} exceeds {INFL8_MAX_RANK}"));
    }
    // SAFETY: null or NUL-terminated, valid while the model lives (ABI).
    let name = unsafe { lossy(desc.name) }.map_or_else(|| default_name.to_owned(), Cow::into_owned);
    let shape = desc.dims[..rank]
        .iter()
        .enumerate()
        .map(|(i, &d)| match d {
            INFL8_DIM_SYMBOLIC if i == 0 => Ok(Dim::Symbolic("N".into())),
            INFL8_DIM_SYMBOLIC => Ok(Dim::Symbolic("?".into())),
            d => usize::try_from(d)
                .map(Dim::Fixed)
                .map_err(|_| format!("dimension {i} of {name} is {d}")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TensorInfo { name, shape })
}

/// Everything the host checks about the tensor a plugin's `model_run`
/// returned for an input of `in_shape`, before it trusts the buffer: the
/// descriptor itself, the model's declared output, and a symbolic batch
/// that must match the input's. Yields its shape and length. Pure (the data
/// pointer is checked, never read), so it can be fuzzed without a plugin.
pub(crate) fn check_run_output(
    out: &Infl8TensorOut,
    input: &TensorInfo,
    output: &TensorInfo,
    in_shape: &[usize],
) -> Result<(Vec<usize>, usize), String> {
    let (out_shape, len) = check_output(out)?;
    if !output.accepts(&out_shape) {
        return Err(format!(
            "shape {out_shape:?} does not fit the declared output {output}"
        ));
    }
    let batch_is_symbolic =
        |info: &TensorInfo| matches!(info.shape.first(), Some(Dim::Symbolic(_)));
    if batch_is_symbolic(input)
        && batch_is_symbolic(output)
        && out_shape.first() != in_shape.first()
    {
        // Not indexed: callers other than `run` need not have checked the
        // input's rank.
        let batch = |s: &[usize]| s.first().map_or_else(|| "none".into(), usize::to_string);
        return Err(format!(
            "batch of {} for an input batch of {}",
            batch(&out_shape),
            batch(in_shape)
        ));
    }
    Ok((out_shape, len))
}

/// Checks a tensor a plugin returned before anything reads its buffer:
/// rank, a shape that fits in memory and agrees with the length, non-null
/// aligned data. Yields its shape and length.
pub fn check_output(out: &Infl8TensorOut) -> Result<(Vec<usize>, usize), String> {
    let rank = out.rank as usize;
    if rank > INFL8_MAX_RANK {
        return Err(format!("rank {rank} exceeds {INFL8_MAX_RANK}"));
    }
    let shape = out.shape[..rank]
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| format!("shape {:?} does not fit in memory", &out.shape[..rank]))?;
    let want = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    let len = usize::try_from(out.len).map_err(|_| format!("length {} overflows", out.len))?;
    if want != len {
        return Err(format!(
            "shape {shape:?} needs {want} values but the buffer holds {len}"
        ));
    }
    if len > 0 {
        if out.data.is_null() {
            return Err(format!("null data for {len} values"));
        }
        if !out.data.is_aligned() {
            return Err("data is not aligned for f32".into());
        }
        if len
            .checked_mul(size_of::<f32>())
            .is_none_or(|b| b > isize::MAX as usize)
        {
            return Err(format!("{len} values do not fit in memory"));
        }
    }
    Ok((shape, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_DESC: Infl8TensorDesc = Infl8TensorDesc {
        name: ptr::null(),
        rank: 0,
        reserved: 0,
        dims: [0; INFL8_MAX_RANK],
    };

    fn out_with(shape: &[u64], data: &[f32], len: u64) -> Infl8TensorOut {
        let mut s = [0; INFL8_MAX_RANK];
        s[..shape.len()].copy_from_slice(shape);
        Infl8TensorOut {
            struct_size: size_of::<Infl8TensorOut>() as u32,
            rank: shape.len() as u32,
            shape: s,
            data: data.as_ptr(),
            len,
            owner: ptr::null_mut(),
        }
    }

    #[test]
    fn outputs_are_validated() {
        let data = [0f32; 6];
        assert_eq!(
            check_output(&out_with(&[2, 3], &data, 6)),
            Ok((vec![2, 3], 6))
        );
        let e = check_output(&out_with(&[2, 3], &data, 5)).unwrap_err();
        assert!(e.contains("needs 6 values but the buffer holds 5"), "{e}");
        let mut bad_rank = out_with(&[2, 3], &data, 6);
        bad_rank.rank = 9;
        assert!(check_output(&bad_rank).unwrap_err().contains("rank 9"));
        let mut null = out_with(&[2], &data, 2);
        null.data = ptr::null();
        assert!(check_output(&null).unwrap_err().contains("null data"));
        let mut empty = out_with(&[0, 3], &data, 0);
        empty.data = ptr::null();
        assert_eq!(check_output(&empty), Ok((vec![0, 3], 0)));
        let huge = out_with(&[u64::MAX, 2], &data, 0);
        assert!(check_output(&huge).is_err());
        let mut misaligned = out_with(&[1], &data, 1);
        misaligned.data = data.as_ptr().cast::<u8>().wrapping_add(1).cast();
        assert!(check_output(&misaligned).unwrap_err().contains("aligned"));
    }

    #[test]
    fn descriptors_become_tensor_infos() {
        let mut desc = EMPTY_DESC;
        desc.rank = 3;
        desc.dims[..3].copy_from_slice(&[INFL8_DIM_SYMBOLIC, 4, INFL8_DIM_SYMBOLIC]);
        let info = tensor_info(&desc, "input").unwrap();
        assert_eq!(info.name, "input");
        assert_eq!(
            info.shape,
            vec![
                Dim::Symbolic("N".into()),
                Dim::Fixed(4),
                Dim::Symbolic("?".into())
            ]
        );
        desc.dims[1] = -7;
        assert!(tensor_info(&desc, "x").unwrap_err().contains("-7"));
        desc.rank = 9;
        assert!(tensor_info(&desc, "x").is_err());
    }

    #[test]
    fn statuses_say_what_the_plugin_left_out() {
        let s = Status {
            code: INFL8_RUN_FAILED,
            message: String::new(),
        };
        assert_eq!(s.text(), "the plugin reported RUN_FAILED without a message");
        assert_eq!(s.to_string(), "RUN_FAILED");
        let s = Status {
            code: INFL8_PANIC,
            message: "boom".into(),
        };
        assert_eq!(
            (s.text(), s.to_string()),
            ("boom".into(), "PANIC: boom".into())
        );
    }
}
