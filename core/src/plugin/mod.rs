//! Backend plugins: the host that loads libraries, and the raw client of the
//! ABI it and the conformance kit call plugins through. The ABI itself and
//! the export macro live in infl8-backend (re-exported here).
//!
//! - [`abi`]: the `#[repr(C)]` contract (ABI 1.2), written so a C header can
//!   be generated from it and a vendor can write a plugin in C.
//! - [`raw`]: the calls through a plugin's function table, with the checks
//!   of what comes back, and nothing else.
//! - [`PluginHost`]: finds `libinfl8_*.so` (platform suffix) in its search
//!   directories, loads them with `libloading`, checks their ABI version and
//!   hands out their backends as ordinary [`crate::Backend`]s.
//! - [`PluginHost::load_model`]: loads a model on the first backend of a
//!   fallback chain that can, logging each fallback ([`load_with_fallback`]).
//! - [`export_plugin!`](crate::export_plugin): turns a list of Rust
//!   [`crate::Backend`]s into a plugin library; [`export`] holds the glue.
//!   Plugin crates use it from infl8-backend, which they depend on alone.
//!
//! ```ignore
//! // in a plugin crate (crate-type = ["cdylib"], lib name `infl8_<something>`)
//! infl8_backend::export_plugin! {
//!     name: "tract",
//!     version: env!("CARGO_PKG_VERSION"),
//!     backends: [Box::new(TractBackend::new())],
//! }
//!
//! // in the host
//! let mut host = PluginHost::new(vec!["/opt/infl8/plugins".into()]);
//! for (path, result) in host.discover() {
//!     if let Err(e) = result { tracing::warn!("{e}") }
//! }
//! let backend = host.backend("tract")?;
//! let model = backend.load(Path::new("model.onnx"), &LoadOptions::default())?;
//! ```

pub use infl8_backend::{abi, export};
mod adapter;
mod chain;
#[cfg(target_os = "linux")]
mod elf;
mod host;
mod host_api;
pub mod raw;

pub use abi::{INFL8_ABI_MAJOR, INFL8_ABI_MINOR, INFL8_ABI_VERSION};
pub use chain::{BackendFailure, ChainError, ChainLoad, load_with_fallback};
pub use host::{BackendInfo, PluginError, PluginHost, PluginSummary};
pub use raw::check_output;
#[cfg(feature = "fuzzing")]
pub(crate) use raw::{check_run_output, tensor_info};

#[cfg(test)]
mod tests;
