//! infl8-core: the runtime library of infl8.
//!
//! Data flows one way: a NIfTI file becomes a [`Volume`], is reoriented,
//! resampled and normalised (each step recording its inverse), cut into
//! windows or slabs that a [`backend::Model`] runs in batches, blended back,
//! reduced to labels and mapped back onto the input's own grid.

pub mod budget;
#[cfg(feature = "cli")]
pub mod cli_args;
pub mod config;
pub mod engine;
pub mod example;
pub mod failure;
pub mod fsio;
/// Entry points of the `cargo fuzz` targets (`fuzz/`), not a stable API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod inference;
pub mod manifest;
pub mod metrics;
pub mod nifti_io;
pub mod plugin;
pub mod preprocess;
pub mod preview;
pub mod rng;
pub mod segment;
pub mod volume;

pub use backend::{Backend, BackendError, LoadOptions, Model, Tensor, TensorInfo};
/// The backend contract (traits, tensors, errors, the plugin ABI), which
/// plugins depend on alone; re-exported so the runtime's users need one
/// crate.
pub use infl8_backend as backend;
pub use infl8_backend::export_plugin;
pub use volume::Volume;
