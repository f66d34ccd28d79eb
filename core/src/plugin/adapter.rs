//! A plugin's table seen as ordinary [`Backend`]s and [`Model`]s: every
//! call goes through [`super::raw`], and what a plugin returns is checked
//! before the host uses it. The host ([`super::PluginHost`]) builds these
//! from the tables it has checked.

use std::ffi::{CString, c_void};
use std::path::{Path, PathBuf};
use std::ptr::{self, NonNull};
use std::sync::Arc;

use super::abi::*;
use super::raw::{self, Status, check_run_output, tensor_info};
use crate::backend::{
    Backend, BackendError, ForeignBuffer, LoadOptions, Model, Tensor, TensorInfo,
};

/// The function pointers of one library (plain `fn` pointers: `Send + Sync`).
pub(super) struct PluginFns {
    pub(super) library: PathBuf,
    pub(super) model_load: Infl8ModelLoadFn,
    pub(super) model_free: Infl8ModelFreeFn,
    pub(super) model_io: Infl8ModelIoFn,
    pub(super) model_run: Infl8ModelRunFn,
    pub(super) tensor_free: Infl8TensorFreeFn,
    pub(super) options_check: Option<Infl8OptionsCheckFn>,
    /// The plugin's ABI version, for saying why its options go unchecked.
    pub(super) abi_version: u32,
}

pub(super) struct PluginBackend {
    pub(super) fns: Arc<PluginFns>,
    pub(super) index: u32,
    pub(super) name: String,
    pub(super) description: String,
}

impl Backend for PluginBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> &str {
        &self.description
    }

    fn check_options(&self, opts: &LoadOptions) -> Result<Vec<String>, BackendError> {
        let Some(check) = self.fns.options_check else {
            return Err(BackendError::Unsupported(format!(
                "plugin library {} (ABI {}) offers no options_check (ABI 1.2), so the \
                 options of {} are not checked",
                self.fns.library.display(),
                version_string(self.fns.abi_version),
                self.name
            )));
        };
        let json = options_json(opts)?;
        // SAFETY: the function comes from this plugin's checked table and
        // the index was declared by it.
        unsafe { raw::options_check(check, self.index, &json) }.map_err(|s| {
            let message = s.text();
            match s.code {
                INFL8_INVALID_ARGUMENT => BackendError::InvalidArgument(message),
                INFL8_UNSUPPORTED => BackendError::Unsupported(message),
                INFL8_PANIC => BackendError::Panic(message),
                _ => BackendError::Other(message),
            }
        })
    }

    fn load(&self, model: &Path, opts: &LoadOptions) -> Result<Box<dyn Model>, BackendError> {
        let load_error = |message: String| BackendError::Load {
            path: model.display().to_string(),
            message,
        };
        let path = model.to_str().ok_or_else(|| {
            load_error("the path is not valid UTF-8, which plugins require".into())
        })?;
        let path =
            CString::new(path).map_err(|_| load_error("the path contains a NUL byte".into()))?;
        let json = options_json(opts)?;
        // SAFETY: the function comes from this plugin's checked table and
        // the index was declared by it.
        let handle = unsafe { raw::model_load(self.fns.model_load, self.index, &path, &json) }
            .map_err(|s| {
                let message = s.text();
                match s.code {
                    INFL8_PANIC => BackendError::Panic(message),
                    INFL8_UNAVAILABLE => BackendError::Unavailable(message),
                    _ => load_error(message),
                }
            })?;
        let ptr = handle.ok_or_else(|| {
            load_error(format!(
                "plugin library {} returned OK without a model handle",
                self.fns.library.display()
            ))
        })?;
        let handle = ModelHandle {
            fns: self.fns.clone(),
            ptr,
        };
        let (input, output) = handle.io()?;
        Ok(Box::new(PluginModel {
            handle,
            input,
            output,
        }))
    }
}

/// The load options as the ABI's NUL-terminated JSON.
fn options_json(opts: &LoadOptions) -> Result<CString, BackendError> {
    serde_json::to_string(opts)
        .ok()
        .and_then(|j| CString::new(j).ok())
        .ok_or_else(|| BackendError::Other("cannot encode the load options as JSON".into()))
}

/// Owns a plugin's model handle; frees it on drop.
struct ModelHandle {
    fns: Arc<PluginFns>,
    ptr: NonNull<Infl8Model>,
}

// SAFETY: the ABI allows every call on a model handle from any thread,
// concurrently (`model_free` aside, which only `Drop` calls, with `&mut`).
unsafe impl Send for ModelHandle {}
// SAFETY: see `Send` above.
unsafe impl Sync for ModelHandle {}

impl Drop for ModelHandle {
    fn drop(&mut self) {
        // SAFETY: the handle is live and freed exactly once, here.
        let status = unsafe { (self.fns.model_free)(self.ptr.as_ptr()) };
        if status != INFL8_OK {
            tracing::warn!(
                library = %self.fns.library.display(),
                "model_free failed with status {}",
                status_name(status)
            );
        }
    }
}

const EMPTY_DESC: Infl8TensorDesc = Infl8TensorDesc {
    name: ptr::null(),
    rank: 0,
    reserved: 0,
    dims: [0; INFL8_MAX_RANK],
};

impl ModelHandle {
    fn io(&self) -> Result<(TensorInfo, TensorInfo), BackendError> {
        let mut io = Infl8ModelIo {
            struct_size: size_of::<Infl8ModelIo>() as u32,
            reserved: 0,
            input: EMPTY_DESC,
            output: EMPTY_DESC,
        };
        // SAFETY: live handle of this table, writable out struct of the
        // size it declares.
        unsafe { raw::model_io(self.fns.model_io, self.ptr.as_ptr(), &mut io) }.map_err(|s| {
            let message = s.text();
            match s.code {
                INFL8_PANIC => BackendError::Panic(message),
                _ => BackendError::Other(format!(
                    "plugin library {} cannot describe the model: {message}",
                    self.fns.library.display()
                )),
            }
        })?;
        // The names stay valid until model_free; tensor_info copies them.
        let info = |desc: &Infl8TensorDesc, default: &str| {
            tensor_info(desc, default).map_err(|reason| {
                BackendError::Other(format!(
                    "plugin library {} describes its model badly: {reason}",
                    self.fns.library.display()
                ))
            })
        };
        Ok((info(&io.input, "input")?, info(&io.output, "output")?))
    }
}

struct PluginModel {
    handle: ModelHandle,
    input: TensorInfo,
    output: TensorInfo,
}

impl Model for PluginModel {
    fn input(&self) -> &TensorInfo {
        &self.input
    }

    fn output(&self) -> &TensorInfo {
        &self.output
    }

    fn run(&self, data: &[f32], shape: &[usize]) -> Result<Tensor, BackendError> {
        let fns = &self.handle.fns;
        // Checked here so that the plugin only ever sees inputs that fit,
        // and so that the rank fits the ABI (the input's rank does).
        self.input.check_run_input(data.len(), shape)?;
        let mut dims = [0u64; INFL8_MAX_RANK];
        for (slot, &d) in dims.iter_mut().zip(shape) {
            *slot = d as u64;
        }
        // SAFETY: live handle of this table; `data` holds the product of
        // `dims[..rank]` values (checked above) and outlives the call.
        let out = unsafe {
            raw::model_run(
                fns.model_run,
                self.handle.ptr.as_ptr(),
                data.as_ptr(),
                &dims[..shape.len()],
            )
        }
        // On failure the out struct is not ours to free (ABI).
        .map_err(|s: Status| match s.code {
            INFL8_PANIC => BackendError::Panic(s.text()),
            INFL8_SHAPE_MISMATCH => BackendError::Shape {
                got: shape.to_vec(),
                expected: if s.message.is_empty() {
                    self.input.to_string()
                } else {
                    s.message
                },
            },
            _ => BackendError::Run(s.text()),
        })?;
        // Owned from here on: every early return below frees it.
        let mut buffer = PluginBuffer {
            fns: fns.clone(),
            owner: out.owner,
            data: out.data,
            len: 0,
        };
        let invalid = |reason: String| {
            BackendError::Run(format!(
                "plugin library {} returned an invalid output: {reason}",
                fns.library.display()
            ))
        };
        let (out_shape, len) =
            check_run_output(&out, &self.input, &self.output, shape).map_err(invalid)?;
        buffer.len = len;
        Tensor::from_foreign(out_shape, Box::new(buffer))
    }
}

/// An output tensor still owned by the plugin; released through
/// `tensor_free` when dropped.
struct PluginBuffer {
    fns: Arc<PluginFns>,
    owner: *mut c_void,
    data: *const f32,
    len: usize,
}

// SAFETY: the ABI lets `tensor_free` run on any thread, and the data stays
// unchanged until then, so the buffer may move between threads.
unsafe impl Send for PluginBuffer {}

impl ForeignBuffer for PluginBuffer {
    fn as_slice(&self) -> &[f32] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `check_output` verified non-null, aligned and `len`
        // values in size; the plugin keeps them until `tensor_free`.
        unsafe { std::slice::from_raw_parts(self.data, self.len) }
    }
}

impl Drop for PluginBuffer {
    fn drop(&mut self) {
        if self.owner.is_null() {
            return;
        }
        // SAFETY: `owner` came from a successful `model_run` and is released
        // exactly once, here.
        let status = unsafe { (self.fns.tensor_free)(self.owner) };
        if status != INFL8_OK {
            tracing::warn!(
                library = %self.fns.library.display(),
                "tensor_free failed with status {}",
                status_name(status)
            );
        }
    }
}
