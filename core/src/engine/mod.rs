//! Opening a model for a run, from [`Settings`]: the backend chain (the
//! first backend that loads it, each fallback logged), the manifest
//! resolved against the model, the window batch sized by the memory budget
//! and the per-volume deadline. Every program that runs a model for
//! segmentation (`infl8 segment`, the watch service's worker) opens it
//! here, so they cannot disagree on how.

mod limits;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use infl8_backend::{Backend, Model};
use tracing::{info, warn};

pub use limits::{
    Deadline, DeadlineModel, TimedOut, check_declared_input, window_batch, window_bytes,
};

use crate::config::Settings;
use crate::manifest::{self, ManifestError};
use crate::plugin::{ChainError, PluginHost};
use crate::segment::{SegmentError, Segmenter};

/// Why a model cannot be opened for a run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// One window, or the model's fixed batch, does not fit
    /// `limits.memory_budget_mb`.
    #[error("{0}")]
    OverBudget(String),
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// A model opened for a run.
pub struct Engine {
    pub segmenter: Segmenter,
    /// The backend of the chain that loaded the model.
    pub backend: String,
    /// The plugin library that backend came from.
    pub library: PathBuf,
    /// Restarted by [`Engine::within_deadline`] for each volume.
    pub deadline: Deadline,
}

impl Engine {
    /// Runs one volume's `work` on the segmenter within the deadline, which
    /// restarts for it. A failure once the deadline has passed is the
    /// timeout (the model refuses every call after it), not the error that
    /// surfaced.
    pub fn within_deadline<T>(
        &self,
        input: &Path,
        work: impl FnOnce(&Segmenter) -> Result<T, SegmentError>,
    ) -> Result<T, SegmentError> {
        self.deadline.start();
        work(&self.segmenter).map_err(|e| {
            if self.deadline.expired() {
                SegmentError::TimedOut(self.deadline.error(input))
            } else {
                e
            }
        })
    }
}

/// A plugin host with the settings' directories and permission rule.
pub fn new_host(settings: &Settings) -> PluginHost {
    PluginHost::new(settings.plugin_dirs.clone())
        .allow_insecure_permissions(settings.plugins.allow_insecure_permissions)
}

/// A model loaded on a backend, and the library that backend came from.
pub struct LoadedModel {
    pub backend: Arc<dyn Backend>,
    pub model: Box<dyn Model>,
    pub library: PathBuf,
}

/// The model, loaded on the first backend of the settings' chain that can
/// (each fallback is logged with its reason). Only the libraries the chain
/// needs are loaded, when they are named after their backends.
pub fn load_model(settings: &Settings, model: &Path) -> Result<LoadedModel, ChainError> {
    let mut host = new_host(settings);
    for (path, result) in host.discover_for(&settings.backend_chain()) {
        if let Err(e) = result {
            warn!(library = ?path, "plugin not loaded: {}", e.to_string().escape_debug());
        }
    }
    let loaded = host.load_model(&settings.backend_chain(), model, |name| {
        settings.load_options(name)
    })?;
    let library = host
        .backends()
        .into_iter()
        .find(|b| b.name == loaded.backend.name())
        .map(|b| b.library)
        .unwrap_or_default();
    Ok(LoadedModel {
        backend: loaded.backend,
        model: loaded.model,
        library,
    })
}

/// Opens `model_path` for a run with `settings`.
pub fn open(settings: &Settings, model_path: &Path) -> Result<Engine, EngineError> {
    check_declared_input(&settings.limits, model_path)?;
    let LoadedModel {
        backend,
        model,
        library,
    } = load_model(settings, model_path)?;
    let (manifest, origin) =
        manifest::resolve(model_path, model.input(), model.output(), &settings.model)?;
    info!(
        model = %model_path.display(),
        backend = backend.name(),
        manifest = %origin,
        input = %model.input(),
        output = %model.output(),
        "model loaded"
    );
    let window_batch = window_batch(
        settings.window_batch,
        &settings.limits,
        &manifest,
        model.as_ref(),
    )?;
    let deadline = Deadline::new(settings.limits.timeout());
    Ok(Engine {
        segmenter: Segmenter {
            model: DeadlineModel::wrap(model, &deadline),
            window_batch,
            postprocess: settings.postprocess.effective(manifest.postprocess),
            manifest,
        },
        backend: backend.name().to_string(),
        library,
        deadline,
    })
}
