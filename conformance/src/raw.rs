//! The plugin ABI called directly, without the host's safe wrapper: the kit
//! needs the raw status codes, the bytes written into caller buffers and the
//! ability to pass deliberately bad arguments. The calls themselves are the
//! host's own raw client ([`infl8_core::plugin::raw`]); this adds what only
//! the kit does (open a library by hand, guard bytes, copy outputs out).

use std::ffi::{CStr, CString, c_char, c_void};
use std::path::Path;
use std::ptr;

use infl8_core::plugin::abi::*;
use infl8_core::plugin::raw;
pub use infl8_core::plugin::raw::{ERR_CAP, Status, empty_out};

/// An opened plugin library and the table its entry returned.
pub struct Library {
    pub entry: Infl8PluginEntryFn,
    pub entry_status: i32,
    /// Null when the entry stored none.
    pub table: *const Infl8PluginTable,
}

// SAFETY: the table is static, read-only plugin memory; the ABI makes every
// function in it callable from any thread.
unsafe impl Send for Library {}
unsafe impl Sync for Library {}

unsafe extern "C" fn log_sink(
    _ctx: *mut c_void,
    level: u32,
    target: *const c_char,
    message: *const c_char,
) {
    let text = |p: *const c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: the ABI passes NUL-terminated strings, borrowed for the call.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let (target, message) = (text(target), text(message));
    match level {
        INFL8_LOG_ERROR => tracing::error!(plugin_target = %target, "{message}"),
        INFL8_LOG_WARN => tracing::warn!(plugin_target = %target, "{message}"),
        INFL8_LOG_INFO => tracing::info!(plugin_target = %target, "{message}"),
        _ => tracing::debug!(plugin_target = %target, "{message}"),
    }
}

/// The host API the kit offers: logging into `tracing`, no Rust dispatcher
/// (the kit checks the C contract, which every plugin must honour).
pub fn host_api() -> &'static Infl8HostApi {
    static API: std::sync::OnceLock<HostApiBox> = std::sync::OnceLock::new();
    &API.get_or_init(|| {
        HostApiBox(Infl8HostApi {
            abi_version: INFL8_ABI_VERSION,
            struct_size: size_of::<Infl8HostApi>() as u32,
            log_max_level: INFL8_LOG_INFO,
            reserved: 0,
            log_ctx: ptr::null_mut(),
            log: Some(log_sink),
            rust_tracing_compat: ptr::null(),
            rust_tracing_dispatch: ptr::null(),
        })
    })
    .0
}

struct HostApiBox(Infl8HostApi);
// SAFETY: the struct holds only null pointers and a function pointer.
unsafe impl Send for HostApiBox {}
unsafe impl Sync for HostApiBox {}

impl Library {
    /// Opens `path` (never closed: plugin code may hold threads and
    /// destructors) and resolves its entry.
    pub fn open(path: &Path) -> Result<Infl8PluginEntryFn, String> {
        // SAFETY: loading a plugin runs its initialisers: that is what is
        // being checked, in a process of its own.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| e.to_string())?;
        let lib: &'static libloading::Library = Box::leak(Box::new(lib));
        // SAFETY: the entry has this type in every ABI version.
        unsafe { lib.get::<Infl8PluginEntryFn>(INFL8_ENTRY_SYMBOL) }
            .map(|s| *s)
            .map_err(|e| format!("no `{INFL8_ENTRY_SYMBOL}` symbol: {e}"))
    }

    /// Calls the entry as a host of ABI `version` would.
    pub fn call_entry(entry: Infl8PluginEntryFn, version: u32) -> Library {
        let mut table: *const Infl8PluginTable = ptr::null();
        // SAFETY: the entry's signature is fixed; the API lives forever.
        let status = unsafe { entry(version, host_api(), &mut table) };
        Library {
            entry,
            entry_status: status,
            table,
        }
    }

    /// The table, once [`Library::table`] has been checked non-null and
    /// at least ABI 1.0 sized.
    pub fn table(&self) -> &'static Infl8PluginTable {
        // SAFETY: callers check `table` first; the table is static.
        unsafe { &*self.table }
    }
}

/// Reads a plugin-owned string field.
pub(crate) fn plugin_str(p: *const c_char) -> Result<String, String> {
    if p.is_null() {
        return Err("null".into());
    }
    // SAFETY: plugin strings are NUL-terminated and live as long as the library.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map(str::to_owned)
        .map_err(|e| format!("not UTF-8: {e}"))
}

/// Backend descriptors, strided by the table's `backend_desc_size`.
pub fn backends(t: &Infl8PluginTable) -> Vec<Infl8BackendDesc> {
    (0..t.backend_count as usize)
        .map(|i| {
            // SAFETY: the table declares `backend_count` descriptors of
            // `backend_desc_size` bytes each (checked >= 16 before this).
            unsafe {
                t.backends
                    .cast::<u8>()
                    .add(i * t.backend_desc_size as usize)
                    .cast::<Infl8BackendDesc>()
                    .read_unaligned()
            }
        })
        .collect()
}

/// A model loaded through the raw table, freed on drop.
pub struct RawModel {
    table: &'static Infl8PluginTable,
    handle: *mut Infl8Model,
}

// SAFETY: the ABI allows every call on a handle from any thread,
// concurrently (`model_free` only once, from `Drop`).
unsafe impl Send for RawModel {}
unsafe impl Sync for RawModel {}

/// One output tensor, copied out of the plugin's buffer.
pub struct Output {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl RawModel {
    pub fn load(
        table: &'static Infl8PluginTable,
        backend: u32,
        model: &Path,
        options_json: &str,
    ) -> Result<RawModel, Status> {
        let path = CString::new(model.to_string_lossy().as_bytes()).map_err(|e| Status {
            code: INFL8_INVALID_ARGUMENT,
            message: e.to_string(),
        })?;
        let opts = CString::new(options_json).map_err(|e| Status {
            code: INFL8_INVALID_ARGUMENT,
            message: e.to_string(),
        })?;
        let load = table.model_load.ok_or_else(|| missing("model_load"))?;
        // SAFETY: a function of the plugin's static table.
        let handle =
            unsafe { raw::model_load(load, backend, &path, &opts) }?.ok_or_else(|| Status {
                code: INFL8_ERROR,
                message: "model_load returned OK but no handle".into(),
            })?;
        let handle = handle.as_ptr();
        Ok(RawModel { table, handle })
    }

    pub fn handle(&self) -> *mut Infl8Model {
        self.handle
    }

    /// `model_io` into a struct of exactly `struct_size` bytes followed by
    /// guard bytes; also returns whether the guard survived.
    pub fn io(&self) -> Result<(Infl8ModelIo, bool), Status> {
        let f = self.table.model_io.ok_or_else(|| missing("model_io"))?;
        const GUARD: usize = 64;
        let size = size_of::<Infl8ModelIo>();
        // u64 storage keeps the struct aligned.
        let mut buf = vec![0xA5A5_A5A5_A5A5_A5A5u64; (size + GUARD).div_ceil(8)];
        let io = buf.as_mut_ptr().cast::<Infl8ModelIo>();
        // SAFETY: `io` points to `size + GUARD` writable, aligned bytes,
        // the struct's declared size among them.
        unsafe {
            (*io).struct_size = Infl8ModelIo::MIN_SIZE;
            raw::model_io(f, self.handle, io)?;
        }
        let bytes = buf.as_ptr().cast::<u8>();
        // SAFETY: the buffer holds at least `size + GUARD` bytes.
        let guard = unsafe { std::slice::from_raw_parts(bytes.add(size), GUARD) };
        let intact = guard.iter().all(|&b| b == 0xA5);
        // SAFETY: the plugin filled the struct (status OK).
        Ok((unsafe { io.read() }, intact))
    }

    /// Runs one batch, copies the output out and releases the plugin's tensor.
    pub fn run(&self, input: &[f32], shape: &[usize]) -> Result<Output, Status> {
        let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        self.run_raw(input.as_ptr(), &dims)
    }

    /// `model_run` with the given (possibly inconsistent) arguments.
    fn run_raw(&self, input: *const f32, shape: &[u64]) -> Result<Output, Status> {
        let f = self.table.model_run.ok_or_else(|| missing("model_run"))?;
        let free = self
            .table
            .tensor_free
            .ok_or_else(|| missing("tensor_free"))?;
        // SAFETY: `input` holds the values `shape` asks for (or is
        // deliberately null with a shape the plugin must refuse).
        let out = unsafe { raw::model_run(f, self.handle, input, shape) }?;
        let copied = copy_out(&out);
        // SAFETY: `owner` came from this successful run; freed once.
        let freed = unsafe { free(out.owner) };
        let out = copied?;
        if freed != INFL8_OK {
            return Err(Status {
                code: freed,
                message: "tensor_free failed".into(),
            });
        }
        Ok(out)
    }
}

impl Drop for RawModel {
    fn drop(&mut self) {
        if let Some(free) = self.table.model_free {
            // SAFETY: the handle came from model_load; no call is in flight
            // (we hold the only owner).
            unsafe { free(self.handle) };
        }
    }
}

fn missing(what: &str) -> Status {
    Status {
        code: INFL8_ERROR,
        message: format!("the table has no `{what}`"),
    }
}

/// Validates a returned tensor and copies its values.
fn copy_out(out: &Infl8TensorOut) -> Result<Output, Status> {
    let (shape, len) = raw::check_output(out).map_err(|e| Status {
        code: INFL8_ERROR,
        message: format!("output: {e}"),
    })?;
    let data = if len == 0 {
        Vec::new()
    } else {
        // SAFETY: checked non-null, aligned, `len` values; valid until tensor_free.
        unsafe { std::slice::from_raw_parts(out.data, len) }.to_vec()
    };
    Ok(Output { shape, data })
}
