//! Runtime settings, layered: built-in defaults < config file (a firmware
//! profile) < `INFL8_*` environment variables < command-line flags.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::inference::BlendMode;
use crate::nifti_io::{NonFinite, ReadLimits};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration{}: {message}", source_name(.file))]
    Invalid {
        file: Option<PathBuf>,
        message: String,
    },
}

fn source_name(file: &Option<PathBuf>) -> String {
    file.as_ref()
        .map(|f| format!(" in {}", f.display()))
        .unwrap_or_default()
}

/// Everything `infl8 segment` can be told, whatever the layer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Backend to run on (`tract`, `ort-cpu`, a vendor's name...).
    pub backend: String,
    /// Worker threads for the backend; 0 = all cores.
    pub threads: usize,
    /// Windows (or slabs) per backend call.
    pub window_batch: usize,
    /// Extra directories searched for `libinfl8_*` plugins (the executable's
    /// own directory is always searched).
    pub plugin_dirs: Vec<PathBuf>,
    pub limits: Limits,
    pub postprocess: Postprocess,
    /// Settings that complete or override the model's manifest.
    pub model: ModelOverrides,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            backend: "tract".into(),
            threads: 0,
            window_batch: 4,
            plugin_dirs: vec![],
            limits: Limits::default(),
            postprocess: Postprocess::default(),
            model: ModelOverrides::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest input accepted, in voxels (all channels), checked from the
    /// header before any voxel is read.
    pub max_voxels: u64,
    /// What to do with NaN/Inf voxels: `reject` (default) or `zero`.
    pub nonfinite: NonFinite,
}

impl Default for Limits {
    fn default() -> Self {
        let r = ReadLimits::default();
        Limits {
            max_voxels: r.max_voxels,
            nonfinite: r.allow_nonfinite,
        }
    }
}

impl Limits {
    pub fn read_limits(&self) -> ReadLimits {
        ReadLimits {
            max_voxels: self.max_voxels,
            allow_nonfinite: self.nonfinite,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Postprocess {
    /// Keep only the largest 26-connected component of each foreground label.
    pub largest_component: bool,
}

/// Manifest fields a user can give or override (see [`crate::manifest`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelOverrides {
    pub roi: Option<[usize; 3]>,
    pub overlap: Option<f64>,
    pub blend: Option<BlendMode>,
    pub sigma_scale: Option<f64>,
    /// Switches to 2.5D slab inference with this many slices.
    pub slab_depth: Option<usize>,
    /// Intensity window `[lo, hi]`, clipped and scaled to [0, 1].
    pub window: Option<[f64; 2]>,
    /// z-score normalisation instead of a window.
    pub zscore: Option<bool>,
    pub spacing: Option<[f64; 3]>,
    pub input_channels: Option<usize>,
    pub labels: Option<Vec<String>>,
}

/// Builds the settings from the layers. `flags` holds only what the user
/// actually passed on the command line (as a JSON object mirroring
/// [`Settings`]), so unset flags never mask the file or the environment.
pub fn load(
    file: Option<&Path>,
    env: Option<HashMap<String, String>>,
    flags: &serde_json::Value,
) -> Result<Settings, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        file: file.map(Path::to_path_buf),
        message,
    };
    let defaults =
        serde_json::to_string(&Settings::default()).map_err(|e| invalid(e.to_string()))?;
    let mut b = config::Config::builder()
        .add_source(config::File::from_str(&defaults, config::FileFormat::Json));
    if let Some(f) = file {
        if !f.is_file() {
            return Err(invalid("the file does not exist".into()));
        }
        b = b.add_source(config::File::from(f).required(true));
    }
    let mut environment = config::Environment::with_prefix("INFL8")
        .prefix_separator("_")
        .separator("__")
        .list_separator(",")
        .with_list_parse_key("plugin_dirs")
        .try_parsing(true);
    if let Some(map) = env {
        environment = environment.source(Some(map));
    }
    b = b.add_source(environment);
    b = b.add_source(config::File::from_str(
        &flags.to_string(),
        config::FileFormat::Json,
    ));
    let cfg = b.build().map_err(|e| invalid(e.to_string()))?;
    let s: Settings = cfg.try_deserialize().map_err(|e| invalid(e.to_string()))?;
    s.validate().map_err(invalid)?;
    Ok(s)
}

/// Reads and validates one settings file on its own (`infl8 config check`).
pub fn check_file(file: &Path) -> Result<Settings, ConfigError> {
    load(file.into(), Some(HashMap::new()), &serde_json::json!({}))
}

impl Settings {
    fn validate(&self) -> Result<(), String> {
        if self.backend.trim().is_empty() {
            return Err("backend: must not be empty".into());
        }
        if self.window_batch == 0 {
            return Err("window_batch: must be at least 1".into());
        }
        if self.limits.max_voxels == 0 {
            return Err("limits.max_voxels: must be at least 1".into());
        }
        let m = &self.model;
        if let Some(o) = m.overlap
            && !(0.0..1.0).contains(&o)
        {
            return Err(format!("model.overlap: {o} is not in [0, 1)"));
        }
        if let Some(r) = m.roi
            && r.contains(&0)
        {
            return Err(format!("model.roi: {r:?} has a zero size"));
        }
        if let Some(s) = m.spacing
            && s.iter().any(|v| !(v.is_finite() && *v > 0.0))
        {
            return Err(format!("model.spacing: {s:?} must be finite and > 0"));
        }
        if let Some([lo, hi]) = m.window
            && !(lo.is_finite() && hi.is_finite() && hi > lo)
        {
            return Err(format!("model.window: [{lo}, {hi}] needs lo < hi"));
        }
        if let Some(s) = m.sigma_scale
            && !(s.is_finite() && s > 0.0)
        {
            return Err(format!("model.sigma_scale: {s} must be > 0"));
        }
        if m.slab_depth == Some(0) {
            return Err("model.slab_depth: must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults_without_layers() {
        let s = load(None, env(&[]), &json!({})).unwrap();
        assert_eq!(s, Settings::default());
    }

    #[test]
    fn layers_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.toml");
        std::fs::write(
            &f,
            "backend = \"from-file\"\nthreads = 2\nwindow_batch = 8\n[model]\noverlap = 0.5\n",
        )
        .unwrap();
        let s = load(
            Some(&f),
            env(&[("INFL8_THREADS", "3"), ("INFL8_MODEL__OVERLAP", "0.25")]),
            &json!({"threads": 5}),
        )
        .unwrap();
        assert_eq!(s.backend, "from-file");
        assert_eq!(s.window_batch, 8);
        assert_eq!(s.threads, 5, "flag beats env");
        assert_eq!(s.model.overlap, Some(0.25), "env beats file");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_with_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.toml");
        std::fs::write(&f, "bakend = \"tract\"\n").unwrap();
        let e = check_file(&f).unwrap_err().to_string();
        assert!(e.contains("bakend") && e.contains("p.toml"), "{e}");

        std::fs::write(&f, "[model]\noverlap = 1.5\n").unwrap();
        let e = check_file(&f).unwrap_err().to_string();
        assert!(e.contains("model.overlap"), "{e}");

        std::fs::write(&f, "window_batch = \"many\"\n").unwrap();
        let e = check_file(&f).unwrap_err().to_string();
        assert!(e.contains("window_batch"), "{e}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let e = check_file(Path::new("/nonexistent/x.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.toml"));
    }

    #[test]
    fn plugin_dirs_from_env_list() {
        let s = load(None, env(&[("INFL8_PLUGIN_DIRS", "/a,/b")]), &json!({})).unwrap();
        assert_eq!(
            s.plugin_dirs,
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
    }
}
