//! What the host offers every plugin it loads (`Infl8HostApi`): its ABI
//! version, and its log sink, as a C callback and, for Rust plugins built
//! against the same `tracing`, the dispatcher itself.

use std::ffi::{c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::ptr;

use tracing::level_filters::LevelFilter;

use super::abi::*;
use super::raw::lossy;

/// What the host's log callback gets back as its context.
struct LogCtx {
    library: String,
}

/// The host API for one library. Leaked: plugins may keep the pointer and
/// call the log callback for the rest of the process.
pub(super) fn host_api(library: &Path) -> &'static Infl8HostApi {
    let label = library.file_name().map_or_else(
        || library.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let ctx: &'static LogCtx = Box::leak(Box::new(LogCtx { library: label }));
    let dispatch: &'static tracing::Dispatch =
        Box::leak(Box::new(tracing::dispatcher::get_default(|d| d.clone())));
    Box::leak(Box::new(Infl8HostApi {
        abi_version: INFL8_ABI_VERSION,
        struct_size: size_of::<Infl8HostApi>() as u32,
        log_max_level: abi_log_level(LevelFilter::current()),
        reserved: 0,
        log_ctx: ptr::from_ref(ctx).cast_mut().cast::<c_void>(),
        log: Some(host_log),
        rust_tracing_compat: infl8_backend::tracing_compat().as_ptr(),
        rust_tracing_dispatch: ptr::from_ref(dispatch).cast::<c_void>(),
    }))
}

fn abi_log_level(filter: LevelFilter) -> u32 {
    match filter.into_level() {
        None => INFL8_LOG_OFF,
        Some(tracing::Level::ERROR) => INFL8_LOG_ERROR,
        Some(tracing::Level::WARN) => INFL8_LOG_WARN,
        Some(tracing::Level::INFO) => INFL8_LOG_INFO,
        Some(tracing::Level::DEBUG) => INFL8_LOG_DEBUG,
        Some(tracing::Level::TRACE) => INFL8_LOG_TRACE,
    }
}

/// The C log callback every plugin may use: re-emits the record as a
/// `tracing` event with target `infl8::plugin`.
unsafe extern "C" fn host_log(
    ctx: *mut c_void,
    level: u32,
    target: *const c_char,
    message: *const c_char,
) {
    let logged = catch_unwind(AssertUnwindSafe(|| {
        let library = if ctx.is_null() {
            "?"
        } else {
            // SAFETY: a non-null ctx is the LogCtx leaked in `host_api`,
            // handed back by the plugin as the ABI requires.
            unsafe { &(*ctx.cast_const().cast::<LogCtx>()).library }.as_str()
        };
        // SAFETY: null or NUL-terminated, borrowed for this call (ABI).
        let module = unsafe { lossy(target) }.unwrap_or_default();
        // SAFETY: as above.
        let message = unsafe { lossy(message) }.unwrap_or_default();
        macro_rules! emit {
            ($level:expr) => {
                tracing::event!(
                    target: "infl8::plugin",
                    $level,
                    plugin = library,
                    module = %module,
                    "{message}"
                )
            };
        }
        match level {
            INFL8_LOG_ERROR => emit!(tracing::Level::ERROR),
            INFL8_LOG_WARN => emit!(tracing::Level::WARN),
            INFL8_LOG_INFO => emit!(tracing::Level::INFO),
            INFL8_LOG_DEBUG => emit!(tracing::Level::DEBUG),
            _ => emit!(tracing::Level::TRACE),
        }
    }));
    // Unwinding out of an `extern "C"` callback would abort the process.
    if let Err(payload) = logged {
        infl8_backend::export::drop_payload(payload);
    }
}
