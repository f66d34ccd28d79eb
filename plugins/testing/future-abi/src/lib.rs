//! A plugin from the future: its table says ABI 99.0. Written by hand, not
//! with the export macro, because the macro only speaks the current ABI.
//! Like any plugin it refuses a host whose major differs, but still hands
//! out its table so the host can name it in the error.

use std::ffi::c_char;
use std::ptr;

use infl8_backend::abi::{
    INFL8_ABI_MISMATCH, INFL8_INVALID_ARGUMENT, INFL8_OK, Infl8HostApi, Infl8PluginTable,
    abi_major, abi_version,
};

const MAJOR: u32 = 99;

/// What a major-99 table might look like: the frozen header, then fields no
/// ABI 1 host knows.
#[repr(C)]
struct FutureTable {
    abi_version: u32,
    struct_size: u32,
    plugin_name: *const c_char,
    plugin_version: *const c_char,
    quantum_flux: u64,
}

struct Shared(FutureTable);

// SAFETY: immutable static data whose pointers point to static strings.
unsafe impl Sync for Shared {}

static TABLE: Shared = Shared(FutureTable {
    abi_version: abi_version(MAJOR, 0),
    struct_size: size_of::<FutureTable>() as u32,
    plugin_name: c"future-abi".as_ptr(),
    plugin_version: c"99.0.0".as_ptr(),
    quantum_flux: 0,
});

/// The infl8 plugin entry point.
///
/// Nothing here can panic, so, unlike the export macro's entries, it needs
/// no `catch_unwind`.
///
/// # Safety
/// `out_table` must be null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn infl8_plugin_entry(
    host_abi_version: u32,
    _host: *const Infl8HostApi,
    out_table: *mut *const Infl8PluginTable,
) -> i32 {
    if out_table.is_null() {
        return INFL8_INVALID_ARGUMENT;
    }
    // SAFETY: non-null and writable by the caller's contract. The host reads
    // only the frozen header through this pointer before checking the major.
    unsafe { *out_table = ptr::from_ref(&TABLE.0).cast::<Infl8PluginTable>() };
    if abi_major(host_abi_version) == MAJOR {
        INFL8_OK
    } else {
        INFL8_ABI_MISMATCH
    }
}
