//! infl8-backend: the contract between the infl8 runtime and a compute
//! backend, and all a backend plugin needs to depend on.
//!
//! - [`Backend`] and [`Model`]: load a model, describe its I/O
//!   ([`TensorInfo`], [`Dim`]), run a batch into a [`Tensor`];
//! - [`LoadOptions`] (threads, [`Precision`], backend-specific extras) and
//!   [`BackendError`], whose [`ErrorKind`]s mirror the ABI's statuses;
//! - [`batch`]: running a batch in parts a model accepts, written once for
//!   every backend;
//! - [`abi`]: the versioned `#[repr(C)]` plugin ABI the C header of the SDK
//!   is generated from, and [`export_plugin!`] ([`export`]), which turns a
//!   list of Rust backends into a plugin library.
//!
//! The host that loads plugin libraries lives in infl8-core; nothing here
//! reads images, settings or manifests.

pub mod abi;
pub mod batch;
mod error;
pub mod export;
mod model;
mod precision;

pub use error::{BackendError, ErrorKind};
pub use model::{
    Backend, Dim, ForeignBuffer, LoadOptions, Model, PRECISION_KEY, Tensor, TensorInfo,
};
pub use precision::{ParsePrecisionError, Precision};

use std::any::TypeId;
use std::ffi::{CStr, CString};
use std::sync::OnceLock;

/// Fingerprint of the `tracing-core` build this code was compiled against,
/// exchanged through [`abi::Infl8HostApi::rust_tracing_compat`] (the host
/// offers it, the export glue compares it).
///
/// Sharing a `tracing::Dispatch` across a library boundary is sound only if
/// both sides agree on its layout and on the vtable layout of the traits it
/// carries, i.e. same compiler and same `tracing-core` (version, features,
/// dependencies). The `TypeId` of `Dispatch` captures exactly that: rustc
/// hashes its own version into every crate's identity, and cargo hashes the
/// package version, source and features into `-C metadata`. Equal strings
/// therefore mean "same type"; any doubt yields a different string and the
/// plugin falls back to the C log callback, which is always safe.
pub fn tracing_compat() -> &'static CStr {
    static COMPAT: OnceLock<CString> = OnceLock::new();
    COMPAT.get_or_init(|| {
        let text = format!(
            "infl8-tracing/1 dispatch={:?} size={} align={}",
            TypeId::of::<tracing::Dispatch>(),
            std::mem::size_of::<tracing::Dispatch>(),
            std::mem::align_of::<tracing::Dispatch>(),
        );
        // Debug output of a TypeId and integers never holds a NUL; should a
        // future std differ, an empty fingerprint merely disables sharing.
        CString::new(text).unwrap_or_default()
    })
}
