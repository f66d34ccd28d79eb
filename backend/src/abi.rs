//! The infl8 plugin C ABI, version 1.2 (1.0 plus [`INFL8_UNAVAILABLE`] in
//! 1.1 and `Infl8PluginTable::options_check` in 1.2).
//!
//! Everything a plugin and the host exchange is declared here, as `#[repr(C)]`
//! types, integer constants and `extern "C"` function-pointer types, so that a
//! C header can be generated from this file (cbindgen) and a vendor can write
//! a plugin in C or C++. Nothing here is generic, no Rust enum carries data,
//! and nothing but plain data and function pointers crosses the boundary.
//!
//! # Entry point
//!
//! A plugin library exports one symbol, [`INFL8_ENTRY_SYMBOL`], of type
//! [`Infl8PluginEntryFn`]. Its signature never changes, whatever the ABI
//! version:
//!
//! ```c
//! int32_t infl8_plugin_entry(uint32_t host_abi_version,
//!                            const Infl8HostApi *host,
//!                            const Infl8PluginTable **out_table);
//! ```
//!
//! The host passes its ABI version and its services ([`Infl8HostApi`]); the
//! plugin stores a pointer to its static function table ([`Infl8PluginTable`])
//! in `*out_table` and returns [`INFL8_OK`]. A plugin whose ABI major differs
//! from the host's returns [`INFL8_ABI_MISMATCH`] but still stores its table,
//! so the host can name the plugin and its version in the error. Calling the
//! entry more than once (from any thread) is allowed and returns the same
//! table.
//!
//! # Versions and growth
//!
//! A version is `(major << 16) | minor`. Majors must match exactly. Within a
//! major, structs only ever grow at the end: [`Infl8HostApi`] and
//! [`Infl8PluginTable`] start with `abi_version` and `struct_size`, and a
//! reader uses a field only when `struct_size` covers it. Structs the caller
//! allocates and the callee fills ([`Infl8ModelIo`], [`Infl8TensorOut`]) start
//! with `struct_size`, set by the caller; the callee writes no byte past it.
//! The arrays of [`Infl8BackendDesc`] are strided by
//! `Infl8PluginTable::backend_desc_size`, so descriptors can grow too.
//!
//! The leading fields of the table (`abi_version`, `struct_size`,
//! `plugin_name`, `plugin_version`, mirrored by [`Infl8PluginHeader`]) are
//! frozen for every major, so a host can always say which plugin it refuses.
//!
//! # Errors
//!
//! Every function returns an `int32_t` status ([`INFL8_OK`] or one of the
//! `INFL8_*` error codes). Functions that can fail for a reason worth telling
//! take `char *err, size_t err_cap`: on failure the callee writes a UTF-8
//! message there, truncated to `err_cap - 1` bytes at a character boundary and
//! NUL-terminated. `err` may be null or `err_cap` 0, in which case nothing is
//! written. A panic (C++ exception, Rust panic) must never cross the
//! boundary: it becomes [`INFL8_PANIC`] with its message.
//!
//! # Ownership and lifetimes
//!
//! - Strings in the table and in the backend descriptors are NUL-terminated
//!   UTF-8, owned by the plugin, valid for as long as the library is loaded.
//!   The host never unloads a plugin library.
//! - A model handle ([`Infl8Model`]) is opaque. It is created by `model_load`,
//!   destroyed by `model_free`; the names `model_io` reports stay valid until
//!   then.
//! - The host API struct, its `log_ctx` and the strings it points to stay
//!   valid for the life of the process.
//! - An output tensor ([`Infl8TensorOut`]) belongs to the plugin; its `data`
//!   stays valid and unchanged until the host passes its `owner` to
//!   `tensor_free`, exactly once. On failure a function leaves its out
//!   parameters untouched (or null): the host ignores them.
//!
//! # Thread safety
//!
//! - `model_load`, `model_io` and `model_run` may be called from any thread,
//!   concurrently, including **concurrently on the same model handle**
//!   (several host threads run batches through one loaded model). A plugin
//!   whose engine is not reentrant must serialise internally.
//! - `model_free` is called once per handle, when no other call on that
//!   handle is in flight; it may come from any thread.
//! - `tensor_free` may be called from any thread, not only the one that ran
//!   the model, and concurrently with other calls.
//! - The host's `log` callback may be called from any thread, concurrently.
//!
//! # Data
//!
//! ABI 1 carries dense f32 tensors in C order, rank at most
//! [`INFL8_MAX_RANK`]. `model_run` receives one batch (batch dimension first)
//! and returns one contiguous output.

use std::ffi::{c_char, c_void};
use std::mem::{offset_of, size_of};

/// Major version of this ABI: plugin and host majors must be equal.
pub const INFL8_ABI_MAJOR: u32 = 1;
/// Minor version of this ABI: a newer minor only appends (fields, status
/// codes). 1.1 added [`INFL8_UNAVAILABLE`], 1.2
/// `Infl8PluginTable::options_check` ([`Infl8OptionsCheckFn`]).
pub const INFL8_ABI_MINOR: u32 = 2;
/// `(INFL8_ABI_MAJOR << 16) | INFL8_ABI_MINOR`.
pub const INFL8_ABI_VERSION: u32 = (INFL8_ABI_MAJOR << 16) | INFL8_ABI_MINOR;

/// Name of the one symbol a plugin library exports.
pub const INFL8_ENTRY_SYMBOL: &str = "infl8_plugin_entry";

/// Highest tensor rank ABI 1 carries.
pub const INFL8_MAX_RANK: usize = 8;

/// `Infl8TensorDesc::dims` value of a symbolic dimension (e.g. the batch).
pub const INFL8_DIM_SYMBOLIC: i64 = -1;

/// Status: success.
pub const INFL8_OK: i32 = 0;
/// Status: a failure with no more specific code.
pub const INFL8_ERROR: i32 = 1;
/// Status: a null pointer, bad UTF-8, unknown index, bad JSON or too small a struct.
pub const INFL8_INVALID_ARGUMENT: i32 = 2;
/// Status: the plugin panicked (or threw); the message says why.
pub const INFL8_PANIC: i32 = 3;
/// Status: the request is valid but this plugin does not support it (e.g. rank > 8).
pub const INFL8_UNSUPPORTED: i32 = 4;
/// Status: the entry was called with an ABI major the plugin does not speak.
pub const INFL8_ABI_MISMATCH: i32 = 5;
/// Status: the model file is missing, unreadable, corrupt or unsupported.
pub const INFL8_LOAD_FAILED: i32 = 6;
/// Status: the input shape does not fit the model's input; the message
/// describes the input the model expects (the caller knows what it passed).
pub const INFL8_SHAPE_MISMATCH: i32 = 7;
/// Status: running the model failed.
pub const INFL8_RUN_FAILED: i32 = 8;
/// Status (ABI 1.1): the backend cannot run on this machine (its runtime
/// library, GPU or driver is missing); the message says what is missing.
/// Not a fault of the model or the plugin: `model_load` returns it before
/// looking at the model's contents. A plugin answers a 1.0 host
/// [`INFL8_LOAD_FAILED`] instead, which that host knows.
pub const INFL8_UNAVAILABLE: i32 = 9;

/// Log level: nothing (only as `Infl8HostApi::log_max_level`).
pub const INFL8_LOG_OFF: u32 = 0;
/// Log level: error.
pub const INFL8_LOG_ERROR: u32 = 1;
/// Log level: warning.
pub const INFL8_LOG_WARN: u32 = 2;
/// Log level: information.
pub const INFL8_LOG_INFO: u32 = 3;
/// Log level: debugging detail.
pub const INFL8_LOG_DEBUG: u32 = 4;
/// Log level: tracing detail.
pub const INFL8_LOG_TRACE: u32 = 5;

/// A loaded model, opaque to the host. Deliberately not `#[repr(C)]`:
/// cbindgen emits it as an incomplete type, so C code only holds pointers.
pub struct Infl8Model {
    _private: [u8; 0],
}

/// The host's log sink. `level` is one of `INFL8_LOG_ERROR..=INFL8_LOG_TRACE`,
/// `target` (may be null) names the module that logs, `message` is the text;
/// both NUL-terminated UTF-8, only borrowed for the call.
pub type Infl8LogFn = unsafe extern "C" fn(
    ctx: *mut c_void,
    level: u32,
    target: *const c_char,
    message: *const c_char,
);

/// What the host offers a plugin. Lives for the whole process.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Infl8HostApi {
    /// The host's ABI version.
    pub abi_version: u32,
    /// `sizeof(Infl8HostApi)` as the host knows it.
    pub struct_size: u32,
    /// Most verbose level the host records (`INFL8_LOG_*`); a plugin may
    /// skip formatting anything more verbose.
    pub log_max_level: u32,
    /// Always 0 in ABI 1.0.
    pub reserved: u32,
    /// Passed back as the `ctx` argument of `log`.
    pub log_ctx: *mut c_void,
    /// Log sink usable from C ([`Infl8LogFn`]); null if the host takes no logs.
    pub log: Option<
        unsafe extern "C" fn(
            ctx: *mut c_void,
            level: u32,
            target: *const c_char,
            message: *const c_char,
        ),
    >,
    /// For Rust plugins only: a NUL-terminated fingerprint of the host's
    /// compiler and `tracing-core` build. A Rust plugin whose own fingerprint
    /// is byte-for-byte equal may use `rust_tracing_dispatch`; any other
    /// plugin must ignore it. Null when the host offers no dispatcher.
    pub rust_tracing_compat: *const c_char,
    /// For Rust plugins only: a `*const tracing::Dispatch` owned by the host.
    /// Meaningless unless `rust_tracing_compat` matches (see above).
    pub rust_tracing_dispatch: *const c_void,
}

impl Infl8HostApi {
    /// Size of the ABI 1.0 part of the struct: what a 1.x plugin may rely on.
    pub const MIN_SIZE: u32 =
        (offset_of!(Infl8HostApi, rust_tracing_dispatch) + size_of::<*const c_void>()) as u32;
}

/// One backend a plugin offers (e.g. `ort-cpu`, `ort-cuda`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Infl8BackendDesc {
    /// Unique name users select the backend by. NUL-terminated UTF-8.
    pub name: *const c_char,
    /// One line for listings. NUL-terminated UTF-8; may be null.
    pub description: *const c_char,
}

/// Loads `model_path` (NUL-terminated UTF-8) with the backend at
/// `backend_index`. `options_json` is a NUL-terminated JSON object
/// (`{"threads": 0, "extra": {...}, "precision": "fp32"}`; the infl8 host
/// also mirrors `precision` into `extra`), or null for defaults; unknown
/// keys must be ignored. On success stores a new handle in `*out_model`.
pub type Infl8ModelLoadFn = unsafe extern "C" fn(
    backend_index: u32,
    model_path: *const c_char,
    options_json: *const c_char,
    out_model: *mut *mut Infl8Model,
    err: *mut c_char,
    err_cap: usize,
) -> i32;

/// Destroys a model handle. A null handle is a no-op.
pub type Infl8ModelFreeFn = unsafe extern "C" fn(model: *mut Infl8Model) -> i32;

/// Describes the model's input and output into `*out_io` (the caller sets
/// `out_io->struct_size`).
pub type Infl8ModelIoFn = unsafe extern "C" fn(
    model: *const Infl8Model,
    out_io: *mut Infl8ModelIo,
    err: *mut c_char,
    err_cap: usize,
) -> i32;

/// Runs one batch: `input` holds the product of `shape[0..rank]` f32 values
/// in C order. On success fills `*out` (the caller sets `out->struct_size`).
pub type Infl8ModelRunFn = unsafe extern "C" fn(
    model: *const Infl8Model,
    input: *const f32,
    shape: *const u64,
    rank: u32,
    out: *mut Infl8TensorOut,
    err: *mut c_char,
    err_cap: usize,
) -> i32;

/// Releases an output tensor by its `owner`. A null owner is a no-op.
pub type Infl8TensorFreeFn = unsafe extern "C" fn(owner: *mut c_void) -> i32;

/// (ABI 1.2) Checks the options a `model_load` of the backend at
/// `backend_index` would take, without a model: `options_json` as for
/// [`Infl8ModelLoadFn`]. Returns [`INFL8_OK`] when the backend reads every
/// key of `extra` and every value is valid, [`INFL8_INVALID_ARGUMENT`] with
/// a message that starts with the offending key (`key: problem`) otherwise,
/// or [`INFL8_UNSUPPORTED`] when this backend does not check its options.
/// Unlike `model_load`, which must ignore unknown keys, it reports them: it
/// is how `infl8 config check` catches a misspelt option before a
/// deployment. On [`INFL8_OK`] the plugin may write notes into `err`, one
/// per line, each `key: note` (a key for another of its backends, a
/// precision it accepts but has no switch for); the host shows them.
pub type Infl8OptionsCheckFn = unsafe extern "C" fn(
    backend_index: u32,
    options_json: *const c_char,
    err: *mut c_char,
    err_cap: usize,
) -> i32;

/// Type of the exported [`INFL8_ENTRY_SYMBOL`]. Never changes.
pub type Infl8PluginEntryFn = unsafe extern "C" fn(
    host_abi_version: u32,
    host: *const Infl8HostApi,
    out_table: *mut *const Infl8PluginTable,
) -> i32;

/// What a plugin offers the host. Static in the plugin, never freed.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Infl8PluginTable {
    /// The plugin's ABI version. Frozen field (see [`Infl8PluginHeader`]).
    pub abi_version: u32,
    /// `sizeof(Infl8PluginTable)` as the plugin knows it. Frozen field.
    pub struct_size: u32,
    /// Plugin name, e.g. `tract`. NUL-terminated UTF-8. Frozen field.
    pub plugin_name: *const c_char,
    /// Plugin version, e.g. `0.1.0`. NUL-terminated UTF-8. Frozen field.
    pub plugin_version: *const c_char,
    /// Number of entries in `backends`.
    pub backend_count: u32,
    /// Stride of `backends` in bytes: `sizeof(Infl8BackendDesc)` as the
    /// plugin knows it.
    pub backend_desc_size: u32,
    /// `backend_count` descriptors; the index is what `model_load` takes.
    pub backends: *const Infl8BackendDesc,
    // The function pointers spell their types out rather than naming the
    // aliases above: cbindgen cannot see through an alias inside `Option`,
    // and would emit an opaque struct instead of a nullable pointer. The
    // `fields_match_aliases` test makes the compiler hold the two equal.
    /// Signature and contract: [`Infl8ModelLoadFn`].
    pub model_load: Option<
        unsafe extern "C" fn(
            backend_index: u32,
            model_path: *const c_char,
            options_json: *const c_char,
            out_model: *mut *mut Infl8Model,
            err: *mut c_char,
            err_cap: usize,
        ) -> i32,
    >,
    /// Signature and contract: [`Infl8ModelFreeFn`].
    pub model_free: Option<unsafe extern "C" fn(model: *mut Infl8Model) -> i32>,
    /// Signature and contract: [`Infl8ModelIoFn`].
    pub model_io: Option<
        unsafe extern "C" fn(
            model: *const Infl8Model,
            out_io: *mut Infl8ModelIo,
            err: *mut c_char,
            err_cap: usize,
        ) -> i32,
    >,
    /// Signature and contract: [`Infl8ModelRunFn`].
    pub model_run: Option<
        unsafe extern "C" fn(
            model: *const Infl8Model,
            input: *const f32,
            shape: *const u64,
            rank: u32,
            out: *mut Infl8TensorOut,
            err: *mut c_char,
            err_cap: usize,
        ) -> i32,
    >,
    /// Signature and contract: [`Infl8TensorFreeFn`].
    pub tensor_free: Option<unsafe extern "C" fn(owner: *mut c_void) -> i32>,
    /// (ABI 1.2; read only when `struct_size` covers it, may be null.)
    /// Signature and contract: [`Infl8OptionsCheckFn`].
    pub options_check: Option<
        unsafe extern "C" fn(
            backend_index: u32,
            options_json: *const c_char,
            err: *mut c_char,
            err_cap: usize,
        ) -> i32,
    >,
}

impl Infl8PluginTable {
    /// Size of the ABI 1.0 part of the table: what a 1.x host needs.
    pub const MIN_SIZE: u32 =
        (offset_of!(Infl8PluginTable, tensor_free) + size_of::<Option<Infl8TensorFreeFn>>()) as u32;
}

/// The leading fields of every plugin table, of every ABI major: enough for a
/// host to name a plugin it cannot talk to.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Infl8PluginHeader {
    pub abi_version: u32,
    pub struct_size: u32,
    pub plugin_name: *const c_char,
    pub plugin_version: *const c_char,
}

/// Name and shape of a model input or output.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Infl8TensorDesc {
    /// NUL-terminated UTF-8, owned by the model (valid until `model_free`).
    pub name: *const c_char,
    /// Number of valid entries in `dims`, at most [`INFL8_MAX_RANK`].
    pub rank: u32,
    /// Always 0 in ABI 1.0.
    pub reserved: u32,
    /// Size of each dimension, or [`INFL8_DIM_SYMBOLIC`].
    pub dims: [i64; INFL8_MAX_RANK],
}

/// Output of `model_io`. One input, one output in ABI 1.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Infl8ModelIo {
    /// Set by the caller to `sizeof(Infl8ModelIo)` as it knows it.
    pub struct_size: u32,
    /// Always 0 in ABI 1.0.
    pub reserved: u32,
    pub input: Infl8TensorDesc,
    pub output: Infl8TensorDesc,
}

impl Infl8ModelIo {
    /// Size of the ABI 1.0 part: what a 1.x plugin writes.
    pub const MIN_SIZE: u32 =
        (offset_of!(Infl8ModelIo, output) + size_of::<Infl8TensorDesc>()) as u32;
}

/// Output of `model_run`: a dense f32 tensor owned by the plugin.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Infl8TensorOut {
    /// Set by the caller to `sizeof(Infl8TensorOut)` as it knows it.
    pub struct_size: u32,
    /// Number of valid entries in `shape`, at most [`INFL8_MAX_RANK`].
    pub rank: u32,
    pub shape: [u64; INFL8_MAX_RANK],
    /// `len` contiguous values in C order; may be null only when `len` is 0.
    /// Aligned for f32.
    pub data: *const f32,
    /// Number of f32 values at `data`: must equal the product of `shape`.
    pub len: u64,
    /// Handed back to `tensor_free` to release the tensor; may be null when
    /// there is nothing to release.
    pub owner: *mut c_void,
}

impl Infl8TensorOut {
    /// Size of the ABI 1.0 part: what a 1.x plugin writes.
    pub const MIN_SIZE: u32 = (offset_of!(Infl8TensorOut, owner) + size_of::<*mut c_void>()) as u32;
}

// ---------------------------------------------------------------------------
// Rust helpers (not part of the C header: cbindgen skips non-extern items).
// ---------------------------------------------------------------------------

/// Encodes a version as the ABI does.
pub const fn abi_version(major: u32, minor: u32) -> u32 {
    (major << 16) | (minor & 0xffff)
}

/// The major part of an encoded version.
pub const fn abi_major(version: u32) -> u32 {
    version >> 16
}

/// The minor part of an encoded version.
pub const fn abi_minor(version: u32) -> u32 {
    version & 0xffff
}

/// `major.minor`, for messages.
pub fn version_string(version: u32) -> String {
    format!("{}.{}", abi_major(version), abi_minor(version))
}

/// The symbolic name of a status code, for messages.
pub fn status_name(status: i32) -> &'static str {
    match status {
        INFL8_OK => "OK",
        INFL8_ERROR => "ERROR",
        INFL8_INVALID_ARGUMENT => "INVALID_ARGUMENT",
        INFL8_PANIC => "PANIC",
        INFL8_UNSUPPORTED => "UNSUPPORTED",
        INFL8_ABI_MISMATCH => "ABI_MISMATCH",
        INFL8_LOAD_FAILED => "LOAD_FAILED",
        INFL8_SHAPE_MISMATCH => "SHAPE_MISMATCH",
        INFL8_RUN_FAILED => "RUN_FAILED",
        INFL8_UNAVAILABLE => "UNAVAILABLE",
        _ => "UNKNOWN_STATUS",
    }
}

/// The longest prefix of `msg` that fits in `max_bytes` without splitting a
/// UTF-8 character.
pub fn truncate_utf8(msg: &str, max_bytes: usize) -> &str {
    if msg.len() <= max_bytes {
        return msg;
    }
    let mut end = max_bytes;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    &msg[..end]
}

/// Writes `msg` into a caller's error buffer: truncated at a character
/// boundary to `cap - 1` bytes, NUL-terminated. Interior NULs are replaced so
/// a C reader sees the whole message. Writes nothing when `buf` is null or
/// `cap` is 0.
///
/// # Safety
/// `buf` must be null or valid for writes of `cap` bytes.
pub unsafe fn write_message(buf: *mut c_char, cap: usize, msg: &str) {
    if buf.is_null() || cap == 0 {
        return;
    }
    let text = truncate_utf8(msg, cap - 1);
    // SAFETY: the caller guarantees `buf` is writable for `cap` bytes; we
    // write `text.len() + 1 <= cap` bytes.
    let out = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), text.len() + 1) };
    for (dst, &src) in out.iter_mut().zip(text.as_bytes()) {
        // A NUL inside would cut the message short for a C reader; `?` keeps
        // the byte count, so the truncation above stays valid.
        *dst = if src == 0 { b'?' } else { src };
    }
    out[text.len()] = 0;
}

/// Reads a message a callee wrote with [`write_message`] (or any C code):
/// up to the first NUL within the buffer, invalid UTF-8 replaced.
pub fn read_message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_encode_and_decode() {
        assert_eq!(INFL8_ABI_VERSION, 0x0001_0002);
        assert_eq!(abi_version(1, 2), INFL8_ABI_VERSION);
        assert_eq!(abi_major(abi_version(99, 7)), 99);
        assert_eq!(abi_minor(abi_version(99, 7)), 7);
        assert_eq!(version_string(abi_version(2, 3)), "2.3");
    }

    // Compiles only while each function field has its alias's type.
    #[test]
    fn fields_match_aliases() {
        fn fields(t: &Infl8PluginTable, h: &Infl8HostApi) {
            let _: Option<Infl8ModelLoadFn> = t.model_load;
            let _: Option<Infl8ModelFreeFn> = t.model_free;
            let _: Option<Infl8ModelIoFn> = t.model_io;
            let _: Option<Infl8ModelRunFn> = t.model_run;
            let _: Option<Infl8TensorFreeFn> = t.tensor_free;
            let _: Option<Infl8OptionsCheckFn> = t.options_check;
            let _: Option<Infl8LogFn> = h.log;
        }
        let _ = fields;
    }

    #[test]
    fn status_names_cover_all_codes() {
        for code in 0..=9 {
            assert_ne!(status_name(code), "UNKNOWN_STATUS", "code {code}");
        }
        assert_eq!(status_name(42), "UNKNOWN_STATUS");
    }

    // The layout is the contract with C plugins: any change here is an ABI
    // break and must bump the major (or append, and bump the minor).
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn layout_is_pinned() {
        assert_eq!(size_of::<Infl8HostApi>(), 48);
        assert_eq!(Infl8HostApi::MIN_SIZE, 48);
        assert_eq!(offset_of!(Infl8HostApi, log), 24);

        assert_eq!(size_of::<Infl8PluginTable>(), 88);
        assert_eq!(Infl8PluginTable::MIN_SIZE, 80);
        assert_eq!(offset_of!(Infl8PluginTable, options_check), 80);
        assert_eq!(offset_of!(Infl8PluginTable, backend_count), 24);
        assert_eq!(offset_of!(Infl8PluginTable, backends), 32);
        assert_eq!(offset_of!(Infl8PluginTable, model_load), 40);
        assert_eq!(offset_of!(Infl8PluginTable, model_run), 64);

        assert_eq!(size_of::<Infl8PluginHeader>(), 24);
        assert_eq!(
            offset_of!(Infl8PluginHeader, plugin_version),
            offset_of!(Infl8PluginTable, plugin_version)
        );

        assert_eq!(size_of::<Infl8BackendDesc>(), 16);
        assert_eq!(size_of::<Infl8TensorDesc>(), 80);
        assert_eq!(size_of::<Infl8ModelIo>(), 168);
        assert_eq!(Infl8ModelIo::MIN_SIZE, 168);
        assert_eq!(size_of::<Infl8TensorOut>(), 96);
        assert_eq!(Infl8TensorOut::MIN_SIZE, 96);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_utf8("hello", 10), "hello");
        assert_eq!(truncate_utf8("hello", 5), "hello");
        assert_eq!(truncate_utf8("hello", 3), "hel");
        // "é" is two bytes: cutting inside it drops it whole.
        assert_eq!(truncate_utf8("aé", 2), "a");
        assert_eq!(truncate_utf8("aé", 3), "aé");
        assert_eq!(truncate_utf8("🦀x", 3), "");
        assert_eq!(truncate_utf8("", 0), "");
    }

    fn written(cap: usize, msg: &str) -> Vec<u8> {
        let mut buf = vec![0xAAu8; cap + 4];
        // SAFETY: `buf` holds `cap + 4 >= cap` bytes.
        unsafe { write_message(buf.as_mut_ptr().cast(), cap, msg) };
        buf
    }

    #[test]
    fn error_buffer_is_truncated_and_terminated() {
        let buf = written(8, "a long message");
        assert_eq!(&buf[..8], b"a long \0");
        assert_eq!(&buf[8..], &[0xAA; 4], "nothing written past cap");
        assert_eq!(read_message(&buf[..8]), "a long ");

        let buf = written(4, "aé€");
        // 3 bytes of room: "a" + "é" (2 bytes) fit, "€" does not.
        assert_eq!(&buf[..4], "aé\0".as_bytes());

        let buf = written(3, "€uro");
        assert_eq!(buf[0], 0, "a character that does not fit is dropped whole");

        let buf = written(1, "anything");
        assert_eq!(buf[0], 0);

        let buf = written(0, "anything");
        assert_eq!(buf[0], 0xAA, "cap 0 writes nothing");

        let buf = written(16, "nul\0inside");
        assert_eq!(read_message(&buf), "nul?inside");
    }

    #[test]
    fn null_error_buffer_is_ignored() {
        // SAFETY: a null buffer is documented as allowed.
        unsafe { write_message(std::ptr::null_mut(), 100, "ignored") };
    }

    #[test]
    fn read_message_tolerates_garbage() {
        assert_eq!(read_message(b"no terminator"), "no terminator");
        assert_eq!(read_message(b"bad \xff utf8\0junk"), "bad \u{fffd} utf8");
        assert_eq!(read_message(b"\0"), "");
    }
}
