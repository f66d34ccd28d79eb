//! Runtime settings, layered: built-in defaults < config file (a firmware
//! profile) < `INFL8_*` environment variables < command-line flags.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::LoadOptions;
/// Kept here too: the settings' `model` section is where users meet it.
pub use crate::manifest::ModelOverrides;
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
    /// Backend to run on (`tract`, `ort-cpu`, a vendor's name...), or a
    /// fallback chain written with commas (`"ort-cuda,tract"`): the first
    /// backend that loads the model runs it. After [`load`], the effective
    /// chain joined with commas.
    pub backend: String,
    /// The fallback chain as a list (`["ort-tensorrt", "ort-cuda", "tract"]`).
    /// `backend` and `backends` are two spellings of one setting: the
    /// highest layer that gives either decides (a `--backend` flag overrides
    /// a profile's `backends`); one layer must not give both. After
    /// [`load`], always the effective chain (never empty).
    pub backends: Vec<String>,
    /// Backend-specific load options, by backend name or by family (the
    /// name up to its first `-`): a backend `ort-cuda` gets the table `ort`,
    /// overridden key by key by the table `ort-cuda`. Passed to the backend
    /// as [`LoadOptions::extra`]; e.g. `[backend_options.ort] library = ...`.
    pub backend_options: BTreeMap<String, serde_json::Map<String, serde_json::Value>>,
    /// Worker threads for the backend; 0 = all cores.
    pub threads: usize,
    /// Windows (or slabs) per backend call.
    pub window_batch: usize,
    /// Extra directories searched for `libinfl8_*` plugins (the executable's
    /// own directory is always searched).
    pub plugin_dirs: Vec<PathBuf>,
    /// Arithmetic the backend may use: `fp32` (default), `fp16` (TensorRT
    /// builds FP16 kernels) or `int8` (TensorRT INT8; the model must be an
    /// INT8 QDQ model from `infl8-train quantize`). Passed to the backend as
    /// the load option `precision`.
    pub precision: Precision,
    pub limits: Limits,
    pub postprocess: Postprocess,
    /// Settings that complete or override the model's manifest.
    pub model: ModelOverrides,
    /// `infl8 watch`: how the service picks up and records inputs.
    pub watch: WatchSettings,
    /// How plugin libraries are vetted before they are opened.
    pub plugins: PluginSettings,
}

/// See [`Settings::plugins`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PluginSettings {
    /// Open plugin libraries that are group- or world-writable, or sit in
    /// such a directory (refused by default, as ssh refuses such keys:
    /// anyone who can write there can run code as the caller).
    pub allow_insecure_permissions: bool,
}

/// Most backend threads a setting may ask for: more is a typo, and spawning
/// them would take minutes before the backend fails.
pub const MAX_THREADS: usize = 1024;

/// See [`Settings::precision`]. Part of the backend contract, where plugins
/// read it; re-exported so settings keep naming it here.
pub use infl8_backend::Precision;

/// Settings of the `infl8 watch` service.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WatchSettings {
    /// A file not named `*.part` is taken once its size and modification
    /// time have not changed for this many seconds.
    pub stable_secs: f64,
    /// How often the inbox is scanned, in milliseconds.
    pub poll_ms: u64,
    /// Move inputs to `<outbox>/done/` (true) or leave them in the inbox and
    /// only record them in the journal (false).
    pub move_inputs: bool,
    /// Attempts at one input that ended with the service itself dying (a
    /// crash, `kill -9`, power loss) before the input counts as poison and
    /// goes to `failed/`.
    pub max_attempts: u32,
    /// On SIGTERM, how long the volume in progress may still take to finish
    /// before its worker is killed and the input left for the next start.
    pub stop_grace_s: f64,
}

impl Default for WatchSettings {
    fn default() -> Self {
        WatchSettings {
            stable_secs: 2.0,
            poll_ms: 500,
            move_inputs: true,
            max_attempts: 3,
            stop_grace_s: 2.0,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            backend: "tract".into(),
            backends: vec!["tract".into()],
            backend_options: BTreeMap::new(),
            threads: 0,
            window_batch: 4,
            plugin_dirs: vec![],
            precision: Precision::default(),
            limits: Limits::default(),
            postprocess: Postprocess::default(),
            model: ModelOverrides::default(),
            watch: WatchSettings::default(),
            plugins: PluginSettings::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest input accepted, in voxels (all channels), checked from the
    /// header before any voxel is read.
    pub max_voxels: u64,
    /// Largest input accepted, in bytes: the file on disk and the voxel data
    /// its header declares (uncompressed), both checked before any voxel is
    /// read (and, in `infl8 watch`, before the file is hashed: a sparse
    /// file can claim terabytes). Default 4 GiB; 0 = no limit beyond
    /// `max_voxels`.
    pub max_input_bytes: u64,
    /// What to do with NaN/Inf voxels: `reject` (default) or `zero`.
    pub nonfinite: NonFinite,
    /// Longest a volume may take, in seconds (read to written); past it the
    /// volume fails with a timeout error. 0 = no limit.
    pub timeout_s: f64,
    /// Memory one volume's run may take, in MiB: every allocation that
    /// grows with the image, the model grid (`model.spacing`), the window
    /// (`model.roi`) or the batch is checked against it before it is made,
    /// and it caps `window_batch`. Defaults to half the physical memory
    /// (see [`default_memory_budget_mb`]); 0 = no cap.
    pub memory_budget_mb: u64,
}

/// Above any real scan (a 512^3 float64 volume is 1 GiB), far below what
/// a hostile or sparse file can declare.
pub const DEFAULT_MAX_INPUT_BYTES: u64 = 4 << 30;

/// Half of the machine's physical memory (`MemTotal` in /proc/meminfo), in
/// MiB, or 4096 MiB where that cannot be read: the run and the operating
/// system, file cache and other services share the rest.
pub fn default_memory_budget_mb() -> u64 {
    physical_memory_mb().map_or(4096, |m| (m / 2).max(1))
}

fn physical_memory_mb() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

impl Default for Limits {
    fn default() -> Self {
        let r = ReadLimits::default();
        Limits {
            max_voxels: r.max_voxels,
            max_input_bytes: DEFAULT_MAX_INPUT_BYTES,
            nonfinite: r.allow_nonfinite,
            timeout_s: 0.0,
            memory_budget_mb: default_memory_budget_mb(),
        }
    }
}

impl Limits {
    pub fn read_limits(&self) -> ReadLimits {
        ReadLimits {
            max_voxels: self.max_voxels,
            allow_nonfinite: self.nonfinite,
            max_input_bytes: self.max_input_bytes,
            memory_budget_bytes: self.memory_budget_mb.saturating_mul(1 << 20),
        }
    }

    /// `timeout_s` as a duration; `None` for no limit (0).
    pub fn timeout(&self) -> Option<std::time::Duration> {
        (self.timeout_s > 0.0).then(|| std::time::Duration::from_secs_f64(self.timeout_s))
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Postprocess {
    /// Keep only the largest 26-connected component of each foreground label.
    pub largest_component: bool,
    /// Fill background enclosed by one label.
    pub fill_holes: bool,
    /// Skip the clean-up the model's manifest asks for (only the steps
    /// above run).
    pub ignore_model: bool,
}

impl Postprocess {
    /// What runs on a model whose manifest asks for `model`.
    pub fn effective(
        &self,
        model: crate::manifest::Postprocessing,
    ) -> crate::manifest::Postprocessing {
        let own = crate::manifest::Postprocessing {
            largest_component: self.largest_component,
            fill_holes: self.fill_holes,
        };
        if self.ignore_model {
            own
        } else {
            own.union(model)
        }
    }
}

/// Builds the settings from the layers. `flags` holds only what the user
/// actually passed on the command line (as a JSON object mirroring
/// [`Settings`]), so unset flags never mask the file or the environment.
pub fn load(
    file: Option<&Path>,
    env: Option<HashMap<String, String>>,
    flags: &serde_json::Value,
) -> Result<Settings, ConfigError> {
    let file_source = match file {
        Some(f) => {
            if !f.is_file() {
                return Err(ConfigError::Invalid {
                    file: Some(f.to_path_buf()),
                    message: "the file does not exist".into(),
                });
            }
            Some(config::File::from(f).required(true))
        }
        None => None,
    };
    load_layers(file, file_source, env, flags)
}

/// [`check_file`] for TOML settings already in memory; `name` stands in for
/// the file in error messages.
pub fn check_str(name: &Path, toml: &str) -> Result<Settings, ConfigError> {
    let source = config::File::from_str(toml, config::FileFormat::Toml);
    load_layers(
        Some(name),
        Some(source),
        Some(HashMap::new()),
        &serde_json::json!({}),
    )
}

/// [`load`] once the file layer (read from `file`, or given as text) is known.
fn load_layers<F>(
    file: Option<&Path>,
    file_source: Option<F>,
    env: Option<HashMap<String, String>>,
    flags: &serde_json::Value,
) -> Result<Settings, ConfigError>
where
    F: config::Source + Clone + Send + Sync + 'static,
{
    let invalid = |message: String| ConfigError::Invalid {
        file: file.map(Path::to_path_buf),
        message,
    };
    let mut defaults =
        serde_json::to_value(Settings::default()).map_err(|e| invalid(e.to_string()))?;
    // The defaults give the chain as `backend` only: `backends` is resolved
    // from the layers that set either key (see `Settings::backends`).
    if let Some(m) = defaults.as_object_mut() {
        m.remove("backends");
    }
    let mut b = config::Config::builder().add_source(config::File::from_str(
        &defaults.to_string(),
        config::FileFormat::Json,
    ));
    if let Some(src) = &file_source {
        b = b.add_source(src.clone());
    }
    let mut environment = config::Environment::with_prefix("INFL8")
        .prefix_separator("_")
        .separator("__")
        .list_separator(",")
        .with_list_parse_key("plugin_dirs")
        .with_list_parse_key("backends")
        .try_parsing(true);
    if let Some(map) = env {
        environment = environment.source(Some(map));
    }
    b = b.add_source(environment.clone());
    b = b.add_source(config::File::from_str(
        &flags.to_string(),
        config::FileFormat::Json,
    ));
    let cfg = b.build().map_err(|e| invalid(describe(e, file)))?;
    let mut s: Settings = cfg
        .try_deserialize()
        .map_err(|e| invalid(describe(e, file)))?;

    // Which spelling of the chain the highest layer naming one used.
    use config::Source;
    let mut layers: Vec<(&str, Vec<String>)> = Vec::new();
    if let Some(src) = &file_source {
        let keys = src.collect().map_err(|e| invalid(e.to_string()))?;
        layers.push(("the file", keys.into_keys().collect()));
    }
    let keys = environment.collect().map_err(|e| invalid(e.to_string()))?;
    layers.push(("the environment", keys.into_keys().collect()));
    let flag_keys = flags
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    layers.push(("the command line", flag_keys));
    let mut from_list = false;
    for (layer, keys) in layers.iter().rev() {
        let has = |k: &str| keys.iter().any(|key| key == k);
        match (has("backend"), has("backends")) {
            (true, true) => {
                return Err(invalid(format!(
                    "backend, backends: {layer} gives both; give the chain once, as \
                     `backend = \"a,b\"` or `backends = [\"a\", \"b\"]`"
                )));
            }
            (false, false) => continue,
            (_, list) => {
                from_list = list;
                break;
            }
        }
    }
    let chain = if from_list {
        s.backends.clone()
    } else {
        s.backend.split(',').map(str::to_owned).collect()
    };
    s.backends = chain.iter().map(|b| b.trim().to_owned()).collect();
    s.validate().map_err(invalid)?;
    s.backend = s.backends.join(",");
    Ok(s)
}

/// A `config` error as `key.path: what is wrong`. The crate reports an
/// unknown key as "unknown field `x` ... for key `parent`" (the path of the
/// table, not of the key) and a bad value with the key at the end; the key's
/// whole path first is what a user looks for.
fn describe(e: config::ConfigError, file: Option<&Path>) -> String {
    use config::ConfigError as E;
    // Where the value came from, unless that is the file the error names.
    // `config` names a file by a path relative to the working directory.
    let same_file = |o: &str, f: &Path| {
        let canonical = |p: &Path| std::fs::canonicalize(p).ok();
        Path::new(o) == f || canonical(Path::new(o)).is_some_and(|c| Some(c) == canonical(f))
    };
    let from = |origin: Option<String>| match (origin, file) {
        (Some(o), Some(f)) if same_file(&o, f) => String::new(),
        (Some(o), _) => format!(" (from {o})"),
        (None, _) => String::new(),
    };
    // `config`'s wording for a string that names no variant of an enum.
    let bad_variant = |m: &str| {
        let (_, value) = m
            .strip_prefix("enum ")?
            .split_once(" does not have variant constructor ")?;
        Some(format!("`{value}` is not one of the accepted values"))
    };
    // serde's wording: "unknown field `x`, expected one of `a`, `b`".
    let unknown = |m: &str| {
        let rest = m.strip_prefix("unknown field `")?;
        let (field, rest) = rest.split_once('`')?;
        let expected = rest.trim_start_matches(',').trim();
        Some((field.to_owned(), expected.to_owned()))
    };
    let unknown_key = |path: String, expected: String| {
        if expected.is_empty() {
            format!("{path}: unknown key")
        } else {
            format!("{path}: unknown key ({expected})")
        }
    };
    match e {
        E::Message(m) => match unknown(&m) {
            Some((field, expected)) => unknown_key(field, expected),
            None => m,
        },
        E::At {
            error,
            key: Some(key),
            origin,
        } => {
            let from = from(origin);
            match *error {
                E::Message(m) => match unknown(&m) {
                    Some((field, expected)) => {
                        format!("{}{from}", unknown_key(format!("{key}.{field}"), expected))
                    }
                    None => format!("{key}: {}{from}", bad_variant(&m).unwrap_or(m)),
                },
                other => format!("{key}: {other}{from}"),
            }
        }
        E::Type {
            unexpected,
            expected,
            key: Some(key),
            origin,
        } => {
            let from = from(origin);
            format!("{key}: invalid type: {unexpected}, expected {expected}{from}")
        }
        other => other.to_string(),
    }
}

/// Reads and validates one settings file on its own (`infl8 config check`).
pub fn check_file(file: &Path) -> Result<Settings, ConfigError> {
    load(file.into(), Some(HashMap::new()), &serde_json::json!({}))
}

/// The `backend_options` tables that reach `backend`, weakest first: its
/// family's (`ort` for `ort-cpu`), then its own.
pub fn option_tables(backend: &str) -> impl DoubleEndedIterator<Item = &str> {
    backend
        .split_once('-')
        .map(|(family, _)| family)
        .into_iter()
        .chain(std::iter::once(backend))
}

impl Settings {
    /// The backends to try, in order (see [`Settings::backends`]).
    pub fn backend_chain(&self) -> Vec<String> {
        if self.backends.is_empty() {
            self.backend
                .split(',')
                .map(|b| b.trim().to_owned())
                .filter(|b| !b.is_empty())
                .collect()
        } else {
            self.backends.clone()
        }
    }

    /// What `backend` is loaded with: the thread count (0 = one per core)
    /// and its [`Settings::backend_options`], family table first.
    pub fn load_options(&self, backend: &str) -> LoadOptions {
        let threads = if self.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.threads
        };
        let mut extra = serde_json::Map::new();
        for name in option_tables(backend) {
            if let Some(table) = self.backend_options.get(name) {
                extra.extend(table.clone());
            }
        }
        // A backend table may set its own `precision`; the profile's is the
        // default. A bad one stays in `extra`, verbatim, for the plugin to
        // name in its refusal.
        let precision = extra
            .get("precision")
            .and_then(|v| v.as_str())
            .and_then(|v| v.parse().ok())
            .unwrap_or(self.precision);
        extra
            .entry("precision")
            .or_insert_with(|| self.precision.as_str().into());
        LoadOptions {
            threads,
            precision,
            extra,
        }
    }

    fn validate(&self) -> Result<(), String> {
        let key = if self.backends.len() > 1 {
            "backends"
        } else {
            "backend"
        };
        if self.backends.is_empty() || self.backends.iter().all(|b| b.is_empty()) {
            return Err(format!("{key}: must name at least one backend"));
        }
        for (i, b) in self.backends.iter().enumerate() {
            if b.is_empty() {
                return Err(format!(
                    "{key}: entry {} of {:?} is empty",
                    i + 1,
                    self.backends
                ));
            }
            if self.backends[..i].contains(b) {
                return Err(format!("{key}: `{b}` appears twice in {:?}", self.backends));
            }
        }
        if let Some(name) = self.backend_options.keys().find(|k| k.trim().is_empty()) {
            return Err(format!("backend_options: `{name}` is not a backend name"));
        }
        if self.window_batch == 0 {
            return Err("window_batch: must be at least 1".into());
        }
        if self.threads > MAX_THREADS {
            return Err(format!(
                "threads: {} is more than {MAX_THREADS} (0 = one per core)",
                self.threads
            ));
        }
        if self.limits.max_voxels == 0 {
            return Err("limits.max_voxels: must be at least 1".into());
        }
        let t = self.limits.timeout_s;
        if !(t.is_finite() && t >= 0.0) {
            return Err(format!(
                "limits.timeout_s: {t} must be finite and >= 0 (0 = no limit)"
            ));
        }
        let w = &self.watch;
        if !(w.stop_grace_s.is_finite() && w.stop_grace_s >= 0.0) {
            return Err(format!(
                "watch.stop_grace_s: {} must be finite and >= 0",
                w.stop_grace_s
            ));
        }
        if !(w.stable_secs.is_finite() && w.stable_secs >= 0.0) {
            return Err(format!(
                "watch.stable_secs: {} must be finite and >= 0",
                w.stable_secs
            ));
        }
        if w.poll_ms == 0 {
            return Err("watch.poll_ms: must be at least 1".into());
        }
        if w.max_attempts == 0 {
            return Err("watch.max_attempts: must be at least 1".into());
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
    fn error_messages_name_the_whole_key_path() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.toml");
        for (text, want) in [
            ("bakend = \"tract\"\n", "bakend: unknown key"),
            // `config` alone says "unknown field `max_voxel` ... for key `limits`".
            ("[limits]\nmax_voxel = 1\n", "limits.max_voxel: unknown key"),
            ("[watch]\npoll = 1\n", "watch.poll: unknown key"),
            ("[model]\nroi = [1, 2]\n", "model.roi: invalid length 2"),
            ("window_batch = \"many\"\n", "window_batch: invalid type"),
            (
                "precision = \"fp8\"\n",
                "precision: `fp8` is not a precision",
            ),
            (
                "[limits]\nnonfinite = \"nan\"\n",
                "limits.nonfinite: `nan` is not one of",
            ),
            (
                "[backend_options]\nort = 3\n",
                "backend_options.ort: invalid type",
            ),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = check_file(&f).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("p.toml"), "{text:?}: {e}");
            // The file is named once, not again as the value's origin.
            assert_eq!(e.matches("p.toml").count(), 1, "{e}");
        }
        let e = load(None, env(&[("INFL8_LIMITS__MAX_VOXEL", "3")]), &json!({}));
        let e = e.unwrap_err().to_string();
        assert!(e.contains("limits.max_voxel: unknown key"), "{e}");
        let e = load(None, env(&[("INFL8_THREADS", "x")]), &json!({}));
        let e = e.unwrap_err().to_string();
        assert!(
            e.contains("threads:") && e.contains("the environment"),
            "{e}"
        );
    }

    #[test]
    fn memory_is_bounded_by_default() {
        let kib: u64 = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_owned();
                line.split_whitespace().nth(1)?.parse().ok()
            })
            .unwrap_or(8192 * 1024);
        let s = load(None, env(&[]), &json!({})).unwrap();
        assert_eq!(s.limits.memory_budget_mb, kib / 1024 / 2);
        assert_eq!(
            s.limits.read_limits().memory_budget_bytes,
            (kib / 1024 / 2) << 20
        );
        // 0 still turns the cap off, for whoever asks.
        let s = load(
            None,
            env(&[("INFL8_LIMITS__MEMORY_BUDGET_MB", "0")]),
            &json!({}),
        )
        .unwrap();
        assert_eq!(s.limits.read_limits().memory_budget_bytes, 0);
    }

    #[test]
    fn absurd_thread_counts_are_refused_at_once() {
        let e = load(None, env(&[]), &json!({"threads": 100_000}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("threads: 100000") && e.contains("1024"), "{e}");
        let s = load(None, env(&[]), &json!({"threads": MAX_THREADS})).unwrap();
        assert_eq!(s.threads, MAX_THREADS);
    }

    #[test]
    fn insecure_plugins_are_opt_in() {
        let s = load(None, env(&[]), &json!({})).unwrap();
        assert!(!s.plugins.allow_insecure_permissions);
        let s = load(
            None,
            env(&[("INFL8_PLUGINS__ALLOW_INSECURE_PERMISSIONS", "true")]),
            &json!({}),
        )
        .unwrap();
        assert!(s.plugins.allow_insecure_permissions);
        let e = load(
            None,
            env(&[]),
            &json!({"plugins": {"allow_insecure": true}}),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("plugins.allow_insecure: unknown key"), "{e}");
    }

    #[test]
    fn precision_from_any_layer() {
        let s = load(None, env(&[("INFL8_PRECISION", "FP16")]), &json!({})).unwrap();
        assert_eq!(s.precision, Precision::Fp16);
        assert_eq!(s.load_options("tract").extra["precision"], json!("fp16"));
        assert_eq!(s.load_options("tract").precision, Precision::Fp16);
        let s = load(None, env(&[]), &json!({"precision": "int8"})).unwrap();
        assert_eq!(s.precision, Precision::Int8);
        assert_eq!(
            serde_json::to_value(Precision::Fp16).unwrap(),
            json!("fp16")
        );
    }

    #[test]
    fn missing_file_is_an_error() {
        let e = check_file(Path::new("/nonexistent/x.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.toml"));
    }

    #[test]
    fn settings_text_is_checked_like_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.toml");
        let text =
            "backends = [\"ort-cpu\", \"tract\"]\nwindow_batch = 2\n[model]\noverlap = 0.5\n";
        std::fs::write(&f, text).unwrap();
        assert_eq!(
            check_str(Path::new("p.toml"), text).unwrap(),
            check_file(&f).unwrap()
        );
        for bad in ["[model]\noverlap = 1.5\n", "bakend = 1\n", "threads = "] {
            let e = check_str(Path::new("upload.toml"), bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains("upload.toml"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn plugin_dirs_from_env_list() {
        let s = load(None, env(&[("INFL8_PLUGIN_DIRS", "/a,/b")]), &json!({})).unwrap();
        assert_eq!(
            s.plugin_dirs,
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
    }

    #[test]
    fn a_backend_chain_from_either_key() {
        let s = load(None, env(&[]), &json!({})).unwrap();
        assert_eq!(s.backend_chain(), ["tract"]);
        assert_eq!(s.backend, "tract");

        let s = load(None, env(&[]), &json!({"backend": "ort-cuda, tract"})).unwrap();
        assert_eq!(s.backends, ["ort-cuda", "tract"]);
        assert_eq!(s.backend, "ort-cuda,tract");

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.toml");
        std::fs::write(
            &f,
            "backends = [\"ort-tensorrt\", \"ort-cuda\", \"tract\"]\n",
        )
        .unwrap();
        let s = check_file(&f).unwrap();
        assert_eq!(s.backend_chain(), ["ort-tensorrt", "ort-cuda", "tract"]);
        assert_eq!(s.backend, "ort-tensorrt,ort-cuda,tract");

        // A higher layer's `backend` replaces a lower layer's `backends`, and
        // the other way round.
        let s = load(Some(&f), env(&[]), &json!({"backend": "ort-cpu"})).unwrap();
        assert_eq!(s.backend_chain(), ["ort-cpu"]);
        let s = load(Some(&f), env(&[("INFL8_BACKEND", "tract")]), &json!({})).unwrap();
        assert_eq!(s.backend_chain(), ["tract"]);
        std::fs::write(&f, "backend = \"tract\"\n").unwrap();
        let s = load(
            Some(&f),
            env(&[("INFL8_BACKENDS", "ort-cuda,tract")]),
            &json!({}),
        )
        .unwrap();
        assert_eq!(s.backend_chain(), ["ort-cuda", "tract"]);
        // Neither key anywhere: the default.
        std::fs::write(&f, "threads = 2\n").unwrap();
        let s = check_file(&f).unwrap();
        assert_eq!(s.backend_chain(), ["tract"]);
    }

    #[test]
    fn bad_chains_are_errors_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.toml");
        std::fs::write(&f, "backend = \"tract\"\nbackends = [\"tract\"]\n").unwrap();
        let e = check_file(&f).unwrap_err().to_string();
        assert!(e.contains("gives both") && e.contains("p.toml"), "{e}");

        for (flags, want) in [
            (json!({"backend": ""}), "backend: must name"),
            (json!({"backend": "ort-cuda,,tract"}), "entry 2"),
            (
                json!({"backends": ["tract", "tract"]}),
                "`tract` appears twice",
            ),
            (json!({"backends": []}), "must name at least one backend"),
        ] {
            let e = load(None, env(&[]), &flags).unwrap_err().to_string();
            assert!(e.contains(want), "{flags}: {e}");
        }
    }

    #[test]
    fn backend_options_by_family_then_name() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.toml");
        std::fs::write(
            &f,
            "backends = [\"ort-tensorrt\", \"tract\"]\nthreads = 3\n\
             [backend_options.ort]\nlibrary = \"/opt/ort/libonnxruntime.so\"\ntrt_fp16 = false\n\
             [backend_options.ort-tensorrt]\ntrt_fp16 = true\ntrt_engine_cache_dir = \"/var/cache/trt\"\n",
        )
        .unwrap();
        let s = load(
            Some(&f),
            env(&[("INFL8_BACKEND_OPTIONS__ORT__DEVICE_ID", "1")]),
            &json!({}),
        )
        .unwrap();
        let trt = s.load_options("ort-tensorrt");
        assert_eq!(trt.threads, 3);
        assert_eq!(
            serde_json::Value::Object(trt.extra),
            json!({
                "library": "/opt/ort/libonnxruntime.so",
                "device_id": 1,
                "trt_fp16": true,
                "trt_engine_cache_dir": "/var/cache/trt",
                "precision": "fp32",
            })
        );
        let cpu = s.load_options("ort-cpu");
        assert_eq!(cpu.extra["trt_fp16"], json!(false));
        assert_eq!(
            serde_json::Value::Object(s.load_options("tract").extra),
            json!({"precision": "fp32"})
        );
    }

    #[test]
    fn shipped_profiles_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let s = check_file(&path).unwrap_or_else(|e| panic!("{e}"));
                assert!(!s.backend_chain().is_empty());
                n += 1;
            }
        }
        assert!(n >= 5, "profiles found in {}: {n}", dir.display());
        let nano = check_file(&dir.join("jetson-orin-nano.toml")).unwrap();
        assert_eq!(
            nano.backend_chain(),
            ["ort-tensorrt", "ort-cuda", "tract-cuda", "tract"]
        );
        assert_eq!(nano.precision, Precision::Fp16);
        assert_eq!(
            nano.load_options("ort-tensorrt").extra["precision"],
            serde_json::json!("fp16")
        );
        assert!(nano.limits.memory_budget_mb > 0);
        let pi = check_file(&dir.join("arm64-cpu.toml")).unwrap();
        assert_eq!((pi.backend_chain(), pi.threads), (vec!["tract".into()], 4));
    }
}
