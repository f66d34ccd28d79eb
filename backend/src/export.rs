//! The plugin side of the ABI: generic glue that turns Rust [`Backend`]s into
//! the C function table of [`crate::abi`].
//!
//! Plugin authors use [`export_plugin!`](crate::export_plugin); the items
//! here are public only because the macro expands to them.
//!
//! Every `extern "C"` function below runs its body under `catch_unwind`, so a
//! panic anywhere in a backend becomes [`INFL8_PANIC`] with the panic's
//! message instead of unwinding into the host (which would abort it).

use std::any::Any;
use std::ffi::{CStr, CString, c_char, c_void};
use std::fmt::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::ptr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Once, OnceLock};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span;
use tracing::{Event, Level, Metadata, Subscriber};

use crate::abi::*;
use crate::{Backend, BackendError, Dim, LoadOptions, Model, Tensor, TensorInfo};

/// Generates a plugin library's entry symbol and function table from a list
/// of backends.
///
/// ```ignore
/// infl8_backend::export_plugin! {
///     name: "tract",
///     version: env!("CARGO_PKG_VERSION"),
///     backends: [Box::new(TractBackend::new())],
/// }
/// ```
///
/// Each entry of `backends` is an expression producing a `Box<dyn Backend>`
/// (a `Box<T: Backend>` coerces). They are evaluated once, on the first call
/// of the entry, after the plugin's logging has been connected to the host.
/// Use the macro once per library, in a crate built as a `cdylib`.
#[macro_export]
macro_rules! export_plugin {
    {
        name: $name:expr,
        version: $version:expr,
        backends: [ $($backend:expr),* $(,)? ] $(,)?
    } => {
        #[doc(hidden)]
        pub struct __Infl8ExportedPlugin;

        impl $crate::export::PluginExport for __Infl8ExportedPlugin {
            fn state() -> &'static $crate::export::PluginState {
                static STATE: $crate::export::PluginState =
                    $crate::export::PluginState::new($name, $version, || {
                        ::std::vec![
                            $({
                                let backend: ::std::boxed::Box<dyn $crate::Backend> =
                                    $backend;
                                backend
                            }),*
                        ]
                    });
                &STATE
            }
        }

        /// The infl8 plugin entry point (ABI in `infl8_backend::abi`).
        ///
        /// # Safety
        /// Called by an infl8 host with pointers valid as the ABI describes.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn infl8_plugin_entry(
            host_abi_version: u32,
            host: *const $crate::abi::Infl8HostApi,
            out_table: *mut *const $crate::abi::Infl8PluginTable,
        ) -> i32 {
            // SAFETY: the host upholds the entry's contract; `entry` checks
            // every pointer it dereferences.
            unsafe {
                $crate::export::entry::<__Infl8ExportedPlugin>(
                    host_abi_version,
                    host,
                    out_table,
                )
            }
        }
    };
}

/// Ties a plugin's static state to the generic glue (implemented by
/// [`export_plugin!`](crate::export_plugin)).
pub trait PluginExport: 'static {
    fn state() -> &'static PluginState;
}

/// A plugin's name, version and backends, built into its table on first use.
pub struct PluginState {
    name: &'static str,
    version: &'static str,
    make_backends: fn() -> Vec<Box<dyn Backend>>,
    built: OnceLock<Built>,
    /// The ABI version of the host that last called the entry: status codes
    /// newer than it are answered with the nearest older one it knows.
    host_abi: AtomicU32,
}

impl PluginState {
    pub const fn new(
        name: &'static str,
        version: &'static str,
        make_backends: fn() -> Vec<Box<dyn Backend>>,
    ) -> Self {
        PluginState {
            name,
            version,
            make_backends,
            built: OnceLock::new(),
            host_abi: AtomicU32::new(INFL8_ABI_VERSION),
        }
    }

    fn built<P: PluginExport>(&self) -> &Built {
        self.built.get_or_init(|| Built::new::<P>(self))
    }
}

/// The table and everything its pointers point into. Never mutated after
/// construction, never dropped (it lives in a static).
struct Built {
    backends: Vec<Box<dyn Backend>>,
    table: Infl8PluginTable,
    _descs: Vec<Infl8BackendDesc>,
    _strings: Vec<CString>,
}

// SAFETY: the raw pointers in `table` and `_descs` point into heap buffers
// owned by this same value (`_strings`, `_descs`), which are never mutated
// after construction, so sharing them between threads is sharing immutable
// data. The backends are `Send + Sync` by the `Backend` trait.
unsafe impl Send for Built {}
// SAFETY: see `Send` above.
unsafe impl Sync for Built {}

impl Built {
    fn new<P: PluginExport>(state: &PluginState) -> Built {
        let backends = (state.make_backends)();
        let mut strings = Vec::with_capacity(2 + 2 * backends.len());
        // A CString's heap buffer does not move when the CString does, so
        // pointers taken here stay valid once the strings are stored.
        let mut keep = |s: &str| {
            let c = to_cstring(s);
            let p = c.as_ptr();
            strings.push(c);
            p
        };
        let plugin_name = keep(state.name);
        let plugin_version = keep(state.version);
        let descs: Vec<Infl8BackendDesc> = backends
            .iter()
            .map(|b| Infl8BackendDesc {
                name: keep(b.name()),
                description: keep(b.description()),
            })
            .collect();
        let table = Infl8PluginTable {
            abi_version: INFL8_ABI_VERSION,
            struct_size: size_of::<Infl8PluginTable>() as u32,
            plugin_name,
            plugin_version,
            // Never more than the array holds.
            backend_count: descs.len().min(u32::MAX as usize) as u32,
            backend_desc_size: size_of::<Infl8BackendDesc>() as u32,
            backends: descs.as_ptr(),
            model_load: Some(model_load::<P>),
            model_free: Some(model_free),
            model_io: Some(model_io),
            model_run: Some(model_run),
            tensor_free: Some(tensor_free),
            options_check: Some(options_check::<P>),
        };
        Built {
            backends,
            table,
            _descs: descs,
            _strings: strings,
        }
    }
}

/// A C string from Rust text; a NUL inside would truncate it for C readers,
/// so it is replaced.
fn to_cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "?")).unwrap_or_default()
}

/// A failed call: the status and the message for the caller's buffer.
struct Failure {
    status: i32,
    message: String,
}

impl Failure {
    fn invalid(message: impl Into<String>) -> Self {
        Failure {
            status: INFL8_INVALID_ARGUMENT,
            message: message.into(),
        }
    }
}

impl From<BackendError> for Failure {
    fn from(e: BackendError) -> Self {
        // The host rebuilds the same variant from the status, so only the
        // inner message crosses (no "cannot load model ..." twice; the host
        // knows the shape it passed).
        Failure {
            status: e.kind().status(),
            message: e.into_message(),
        }
    }
}

/// The text of a panic payload (`panic!` gives `&str` or `String`).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

/// Drops a panic payload without letting a panicking `Drop` escape (also
/// what the host's own `extern "C"` callbacks do with a caught panic).
pub fn drop_payload(payload: Box<dyn Any + Send>) {
    let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
}

/// Runs the body of one ABI call, turning a panic into a failure.
fn catch(body: impl FnOnce() -> Result<(), Failure>) -> Result<(), Failure> {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        let message = panic_message(&*payload);
        drop_payload(payload);
        Err(Failure {
            status: INFL8_PANIC,
            message,
        })
    })
}

/// The status of a call; a failure's message goes into the caller's buffer.
///
/// # Safety
/// `err` must be null or writable for `err_cap` bytes.
unsafe fn report(err: *mut c_char, err_cap: usize, result: Result<(), Failure>) -> i32 {
    match result {
        Ok(()) => INFL8_OK,
        Err(f) => {
            // SAFETY: forwarded from the caller.
            unsafe { write_message(err, err_cap, &f.message) };
            f.status
        }
    }
}

/// Borrows a NUL-terminated UTF-8 argument.
///
/// # Safety
/// `p` must be null or point to a NUL-terminated string that outlives `'a`.
unsafe fn utf8_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(Failure::invalid(format!("{what} is null")));
    }
    // SAFETY: non-null, and NUL-terminated by the caller's contract.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str()
        .map_err(|e| Failure::invalid(format!("{what} is not valid UTF-8: {e}")))
}

/// The entry glue behind the macro's `infl8_plugin_entry`.
///
/// # Safety
/// `host` must be null or point to a host API struct valid for the process
/// lifetime; `out_table` must be null or writable.
pub unsafe fn entry<P: PluginExport>(
    host_abi_version: u32,
    host: *const Infl8HostApi,
    out_table: *mut *const Infl8PluginTable,
) -> i32 {
    let caught = catch_unwind(AssertUnwindSafe(|| {
        if out_table.is_null() {
            return INFL8_INVALID_ARGUMENT;
        }
        // SAFETY: non-null and writable by the caller's contract.
        unsafe { *out_table = ptr::null() };
        let state = P::state();
        if abi_major(host_abi_version) != INFL8_ABI_MAJOR {
            // Only the frozen header of a foreign-major host API would be
            // readable, so logging stays disconnected; the table is still
            // handed out so the host can say which plugin refused it.
            let built = state.built::<P>();
            // SAFETY: as above.
            unsafe { *out_table = &built.table };
            return INFL8_ABI_MISMATCH;
        }
        if !host.is_null() {
            // SAFETY: non-null; the leading two fields exist in every version.
            let (version, size) = unsafe { ((*host).abi_version, (*host).struct_size) };
            if abi_major(version) != INFL8_ABI_MAJOR || size < Infl8HostApi::MIN_SIZE {
                return INFL8_INVALID_ARGUMENT;
            }
            // SAFETY: the struct is at least as large as ABI 1.0 needs and,
            // by contract, lives for the process.
            connect_logging(unsafe { &*host });
        }
        state.host_abi.store(host_abi_version, Ordering::Relaxed);
        let built = state.built::<P>();
        // SAFETY: as above.
        unsafe { *out_table = &built.table };
        tracing::debug!(
            plugin = state.name,
            version = state.version,
            host_abi = %version_string(host_abi_version),
            "infl8 plugin ready"
        );
        INFL8_OK
    }));
    caught.unwrap_or_else(|payload| {
        let message = panic_message(&*payload);
        drop_payload(payload);
        // No error buffer in the entry: the log is the only place the
        // message can go, and logging must not unwind out of here either.
        if let Err(p) = catch_unwind(|| tracing::error!("plugin entry panicked: {message}")) {
            drop_payload(p);
        }
        INFL8_PANIC
    })
}

/// What a model handle points to.
struct ModelBox {
    model: Box<dyn Model>,
    input_name: CString,
    output_name: CString,
}

unsafe extern "C" fn model_load<P: PluginExport>(
    backend_index: u32,
    model_path: *const c_char,
    options_json: *const c_char,
    out_model: *mut *mut Infl8Model,
    err: *mut c_char,
    err_cap: usize,
) -> i32 {
    let result = catch(|| {
        if out_model.is_null() {
            return Err(Failure::invalid("out_model is null"));
        }
        // SAFETY: non-null and writable by contract.
        unsafe { *out_model = ptr::null_mut() };
        let backend = backend_at::<P>(backend_index)?;
        // SAFETY: NUL-terminated by contract, borrowed for this call.
        let path = unsafe { utf8_arg(model_path, "model_path")? };
        // SAFETY: as above.
        let opts = unsafe { load_options(options_json)? };
        let model = backend.load(Path::new(path), &opts)?;
        let boxed = Box::new(ModelBox {
            input_name: to_cstring(&model.input().name),
            output_name: to_cstring(&model.output().name),
            model,
        });
        // SAFETY: checked non-null above.
        unsafe { *out_model = Box::into_raw(boxed).cast::<Infl8Model>() };
        Ok(())
    });
    let host_abi = P::state().host_abi.load(Ordering::Relaxed);
    let result = result.map_err(|f| for_host(f, host_abi));
    // SAFETY: `err`/`err_cap` come from the caller as the ABI requires.
    unsafe { report(err, err_cap, result) }
}

/// The backend at `backend_index`, or an invalid-argument failure.
fn backend_at<P: PluginExport>(backend_index: u32) -> Result<&'static dyn Backend, Failure> {
    let built = P::state().built::<P>();
    usize::try_from(backend_index)
        .ok()
        .and_then(|i| built.backends.get(i))
        .map(|b| b.as_ref())
        .ok_or_else(|| {
            Failure::invalid(format!(
                "backend index {backend_index} out of range (plugin has {})",
                built.backends.len()
            ))
        })
}

/// The load options in `options_json`; defaults when it is null.
unsafe fn load_options(options_json: *const c_char) -> Result<LoadOptions, Failure> {
    if options_json.is_null() {
        return Ok(LoadOptions::default());
    }
    // SAFETY: NUL-terminated by contract, borrowed for this call.
    let json = unsafe { utf8_arg(options_json, "options_json")? };
    serde_json::from_str::<LoadOptions>(json)
        .map_err(|e| Failure::invalid(format!("options_json: {e}")))
}

unsafe extern "C" fn options_check<P: PluginExport>(
    backend_index: u32,
    options_json: *const c_char,
    err: *mut c_char,
    err_cap: usize,
) -> i32 {
    let mut notes = String::new();
    let result = catch(|| {
        let backend = backend_at::<P>(backend_index)?;
        // SAFETY: `options_json` comes from the caller as the ABI requires.
        let opts = unsafe { load_options(options_json)? };
        notes = backend.check_options(&opts)?.join("\n");
        Ok(())
    });
    if result.is_ok() {
        // The notes go where a failure's message would, one per line.
        // SAFETY: `err`/`err_cap` come from the caller as the ABI requires.
        unsafe { write_message(err, err_cap, &notes) };
    }
    // SAFETY: as above.
    unsafe { report(err, err_cap, result) }
}

/// A failure as a host of ABI `host_abi` understands it: a 1.0 host does not
/// know `INFL8_UNAVAILABLE` (1.1), so it gets `INFL8_LOAD_FAILED`.
fn for_host(f: Failure, host_abi: u32) -> Failure {
    if f.status == INFL8_UNAVAILABLE && abi_minor(host_abi) < 1 {
        Failure {
            status: INFL8_LOAD_FAILED,
            ..f
        }
    } else {
        f
    }
}

unsafe extern "C" fn model_free(model: *mut Infl8Model) -> i32 {
    let result = catch(|| {
        if !model.is_null() {
            // SAFETY: the handle came from `model_load`'s Box::into_raw
            // and the host frees it once, with no call in flight.
            drop(unsafe { Box::from_raw(model.cast::<ModelBox>()) });
        }
        Ok(())
    });
    // SAFETY: no error buffer to write.
    unsafe { report(ptr::null_mut(), 0, result) }
}

/// # Safety
/// `model` must be null or a live handle from `model_load`.
unsafe fn model_ref<'a>(model: *const Infl8Model) -> Result<&'a ModelBox, Failure> {
    if model.is_null() {
        return Err(Failure::invalid("model handle is null"));
    }
    // SAFETY: a live handle points to a ModelBox; shared access is fine
    // because `Model: Sync`.
    Ok(unsafe { &*model.cast::<ModelBox>() })
}

fn describe(info: &TensorInfo, name: &CString) -> Result<Infl8TensorDesc, Failure> {
    if info.rank() > INFL8_MAX_RANK {
        return Err(Failure {
            status: INFL8_UNSUPPORTED,
            message: format!(
                "tensor {info} has rank {}, ABI 1 carries at most {INFL8_MAX_RANK}",
                info.rank()
            ),
        });
    }
    let mut dims = [0i64; INFL8_MAX_RANK];
    for (slot, d) in dims.iter_mut().zip(&info.shape) {
        *slot = match d {
            Dim::Fixed(n) => i64::try_from(*n).map_err(|_| Failure {
                status: INFL8_UNSUPPORTED,
                message: format!("dimension {n} of {info} does not fit in 64 bits"),
            })?,
            Dim::Symbolic(_) => INFL8_DIM_SYMBOLIC,
        };
    }
    Ok(Infl8TensorDesc {
        name: name.as_ptr(),
        rank: info.rank() as u32,
        reserved: 0,
        dims,
    })
}

unsafe extern "C" fn model_io(
    model: *const Infl8Model,
    out_io: *mut Infl8ModelIo,
    err: *mut c_char,
    err_cap: usize,
) -> i32 {
    let result = catch(|| {
        // SAFETY: a live handle by contract.
        let m = unsafe { model_ref(model)? };
        if out_io.is_null() {
            return Err(Failure::invalid("out_io is null"));
        }
        // SAFETY: non-null; the caller sets struct_size before the call.
        let size = unsafe { (*out_io).struct_size };
        if size < Infl8ModelIo::MIN_SIZE {
            return Err(Failure::invalid(format!(
                "out_io->struct_size is {size}, ABI 1.0 needs {}",
                Infl8ModelIo::MIN_SIZE
            )));
        }
        let input = describe(m.model.input(), &m.input_name)?;
        let output = describe(m.model.output(), &m.output_name)?;
        // SAFETY: the caller's struct holds at least MIN_SIZE bytes,
        // which covers both fields; bytes past them are left alone.
        unsafe {
            (*out_io).input = input;
            (*out_io).output = output;
        }
        Ok(())
    });
    // SAFETY: `err`/`err_cap` come from the caller as the ABI requires.
    unsafe { report(err, err_cap, result) }
}

unsafe extern "C" fn model_run(
    model: *const Infl8Model,
    input: *const f32,
    shape: *const u64,
    rank: u32,
    out: *mut Infl8TensorOut,
    err: *mut c_char,
    err_cap: usize,
) -> i32 {
    let result = catch(|| {
        // SAFETY: a live handle by contract.
        let m = unsafe { model_ref(model)? };
        if out.is_null() {
            return Err(Failure::invalid("out is null"));
        }
        // SAFETY: non-null; the caller sets struct_size before the call.
        let out_size = unsafe { (*out).struct_size };
        if out_size < Infl8TensorOut::MIN_SIZE {
            return Err(Failure::invalid(format!(
                "out->struct_size is {out_size}, ABI 1.0 needs {}",
                Infl8TensorOut::MIN_SIZE
            )));
        }
        let rank = rank as usize;
        if rank > INFL8_MAX_RANK {
            return Err(Failure::invalid(format!(
                "input rank {rank} exceeds {INFL8_MAX_RANK}"
            )));
        }
        if shape.is_null() && rank > 0 {
            return Err(Failure::invalid("shape is null"));
        }
        let dims: Vec<usize> = if rank == 0 {
            Vec::new()
        } else {
            // SAFETY: non-null and `rank` entries long by contract.
            unsafe { std::slice::from_raw_parts(shape, rank) }
                .iter()
                .map(|&d| usize::try_from(d))
                .collect::<Result<_, _>>()
                .map_err(|_| Failure::invalid("a dimension does not fit in usize"))?
        };
        let len = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|n| {
                n.checked_mul(size_of::<f32>())
                    .is_some_and(|b| b <= isize::MAX as usize)
            })
            .ok_or_else(|| Failure::invalid(format!("input shape {dims:?} is too large")))?;
        let data: &[f32] = if len == 0 {
            &[]
        } else {
            if input.is_null() {
                return Err(Failure::invalid("input is null"));
            }
            if !input.is_aligned() {
                return Err(Failure::invalid("input is not aligned for f32"));
            }
            // SAFETY: non-null, aligned, and by contract `len` readable
            // values that stay unchanged for the call.
            unsafe { std::slice::from_raw_parts(input, len) }
        };
        let tensor = m.model.run(data, &dims)?;
        fill_output(tensor, out)
    });
    // SAFETY: `err`/`err_cap` come from the caller as the ABI requires.
    unsafe { report(err, err_cap, result) }
}

/// Hands a tensor to the host: no copy, the tensor itself is the owner.
fn fill_output(tensor: Tensor, out: *mut Infl8TensorOut) -> Result<(), Failure> {
    let rank = tensor.shape().len();
    if rank > INFL8_MAX_RANK {
        return Err(Failure {
            status: INFL8_UNSUPPORTED,
            message: format!("output rank {rank} exceeds {INFL8_MAX_RANK}"),
        });
    }
    let mut shape = [0u64; INFL8_MAX_RANK];
    for (slot, &d) in shape.iter_mut().zip(tensor.shape()) {
        *slot = d as u64;
    }
    let owner = Box::new(tensor);
    // The data lives on the heap (a Vec or a foreign buffer), so moving the
    // Box does not move it: the pointer stays valid until `tensor_free`.
    let data = owner.data();
    let (ptr, len) = (data.as_ptr(), data.len() as u64);
    let owner = Box::into_raw(owner);
    // SAFETY: `out` is non-null and at least MIN_SIZE bytes (checked by the
    // caller of this function); fields past ABI 1.0 are left alone.
    unsafe {
        (*out).rank = rank as u32;
        (*out).shape = shape;
        (*out).data = ptr;
        (*out).len = len;
        (*out).owner = owner.cast::<c_void>();
    }
    Ok(())
}

unsafe extern "C" fn tensor_free(owner: *mut c_void) -> i32 {
    let result = catch(|| {
        if !owner.is_null() {
            // SAFETY: `owner` came from `fill_output`'s Box::into_raw and
            // the host frees it exactly once. `Tensor: Send`, so any
            // thread may drop it.
            drop(unsafe { Box::from_raw(owner.cast::<Tensor>()) });
        }
        Ok(())
    });
    // SAFETY: no error buffer to write.
    unsafe { report(ptr::null_mut(), 0, result) }
}

// ---------------------------------------------------------------------------
// Logging: connect this library's `tracing` to the host.
// ---------------------------------------------------------------------------

/// Does this library share the host's process image (the plugin is linked
/// statically into the host binary)? Then `tracing` and `log` are already the
/// host's own and must be left alone.
fn same_image(host: &Infl8HostApi) -> bool {
    ptr::eq(host.rust_tracing_compat, crate::tracing_compat().as_ptr())
}

/// Routes this library's `tracing` events (and, through them, `log` records
/// bridged by a plugin) to the host, once per library.
///
/// Each Rust cdylib has its own copy of `tracing-core` and so its own global
/// dispatcher, which starts out as "no subscriber". If the host's dispatcher
/// is layout-compatible (same fingerprint), this library adopts it; otherwise
/// it installs a small subscriber that forwards formatted events through the
/// host's C log callback.
fn connect_logging(host: &Infl8HostApi) {
    static CONNECTED: Once = Once::new();
    if same_image(host) {
        return;
    }
    let host = *host;
    CONNECTED.call_once(move || {
        let (dispatch, route) = match host_dispatch(&host) {
            Ok(d) => (d, "the host's tracing dispatcher".to_owned()),
            Err(why) => match host.log {
                Some(log) => {
                    let subscriber = CLogSubscriber {
                        log,
                        ctx: HostCtx(host.log_ctx),
                        max: level_filter(host.log_max_level),
                    };
                    (
                        tracing::Dispatch::new(subscriber),
                        format!("the C log callback ({why})"),
                    )
                }
                None => return,
            },
        };
        if tracing::dispatcher::set_global_default(dispatch).is_ok() {
            tracing::callsite::rebuild_interest_cache();
            tracing::debug!("plugin logging goes through {route}");
        }
    });
}

/// The host's dispatcher, if it is safe to use from this library; else why
/// not.
fn host_dispatch(host: &Infl8HostApi) -> Result<tracing::Dispatch, String> {
    if host.rust_tracing_compat.is_null() || host.rust_tracing_dispatch.is_null() {
        return Err("the host offers no Rust dispatcher".into());
    }
    // SAFETY: non-null and NUL-terminated by the host API contract.
    let theirs = unsafe { CStr::from_ptr(host.rust_tracing_compat) };
    let ours = crate::tracing_compat();
    if ours.is_empty() || theirs != ours {
        return Err(format!(
            "tracing builds differ: host {}, plugin {}",
            theirs.to_string_lossy(),
            ours.to_string_lossy()
        ));
    }
    // SAFETY: equal fingerprints mean the host's `tracing::Dispatch` is the
    // very type this library knows (see `tracing_compat`); the host keeps it
    // alive for the process, and cloning only bumps its Arc.
    Ok(unsafe { (*host.rust_tracing_dispatch.cast::<tracing::Dispatch>()).clone() })
}

fn level_filter(level: u32) -> LevelFilter {
    match level {
        INFL8_LOG_OFF => LevelFilter::OFF,
        INFL8_LOG_ERROR => LevelFilter::ERROR,
        INFL8_LOG_WARN => LevelFilter::WARN,
        INFL8_LOG_INFO => LevelFilter::INFO,
        INFL8_LOG_DEBUG => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    }
}

fn abi_level(level: &Level) -> u32 {
    match *level {
        Level::ERROR => INFL8_LOG_ERROR,
        Level::WARN => INFL8_LOG_WARN,
        Level::INFO => INFL8_LOG_INFO,
        Level::DEBUG => INFL8_LOG_DEBUG,
        Level::TRACE => INFL8_LOG_TRACE,
    }
}

struct HostCtx(*mut c_void);

// SAFETY: the ABI requires the host's log callback and its context to be
// usable from any thread, concurrently.
unsafe impl Send for HostCtx {}
// SAFETY: see `Send` above.
unsafe impl Sync for HostCtx {}

/// Forwards events, formatted, to the host's C log callback. Spans are not
/// forwarded (the C callback has no notion of them).
struct CLogSubscriber {
    log: Infl8LogFn,
    ctx: HostCtx,
    max: LevelFilter,
}

impl Subscriber for CLogSubscriber {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.is_event() && *metadata.level() <= self.max
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.max)
    }

    fn new_span(&self, _span: &span::Attributes<'_>) -> span::Id {
        // Never called for disabled spans; an id is required regardless.
        span::Id::from_u64(1)
    }

    fn record(&self, _span: &span::Id, _values: &span::Record<'_>) {}

    fn record_follows_from(&self, _span: &span::Id, _follows: &span::Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut text = MessageText::default();
        event.record(&mut text);
        let meta = event.metadata();
        let target = to_cstring(text.log_target.as_deref().unwrap_or(meta.target()));
        let message = to_cstring(&text.text);
        // SAFETY: the callback is thread-safe by the ABI; both strings are
        // NUL-terminated and outlive the call.
        unsafe {
            (self.log)(
                self.ctx.0,
                abi_level(meta.level()),
                target.as_ptr(),
                message.as_ptr(),
            )
        };
    }

    fn enter(&self, _span: &span::Id) {}

    fn exit(&self, _span: &span::Id) {}
}

/// The `message` field first, then the other fields as `name=value`.
/// Records bridged from `log` (tracing-log) carry their real target in a
/// `log.target` field, and file/line noise in other `log.*` fields.
#[derive(Default)]
struct MessageText {
    text: String,
    log_target: Option<String>,
}

impl MessageText {
    fn push(&mut self, field: &Field, value: std::fmt::Arguments<'_>) {
        let name = field.name();
        if name == "log.target" {
            self.log_target = Some(value.to_string());
            return;
        }
        if name.starts_with("log.") {
            return;
        }
        let sep = if self.text.is_empty() { "" } else { " " };
        if name == "message" {
            let _ = write!(self.text, "{sep}{value}");
        } else {
            let _ = write!(self.text, "{sep}{name}={value}");
        }
    }
}

impl Visit for MessageText {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.push(field, format_args!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field, format_args!("{value}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_is_a_load_failure_for_a_1_0_host() {
        let f = || Failure {
            status: INFL8_UNAVAILABLE,
            message: "no GPU".into(),
        };
        let old = for_host(f(), abi_version(1, 0));
        assert_eq!(
            (old.status, old.message.as_str()),
            (INFL8_LOAD_FAILED, "no GPU")
        );
        assert_eq!(for_host(f(), abi_version(1, 1)).status, INFL8_UNAVAILABLE);
        let run = Failure {
            status: INFL8_RUN_FAILED,
            message: String::new(),
        };
        assert_eq!(for_host(run, abi_version(1, 0)).status, INFL8_RUN_FAILED);
    }
}
