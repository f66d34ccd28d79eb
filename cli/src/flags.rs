//! Command-line flags, and their translation into the top config layer.

use std::path::PathBuf;

use clap::Args;
pub use infl8_core::cli_args::ModelArgs;
use serde_json::{Map, Value, json};

/// Flags shared by every command that loads a model.
#[derive(Args, Debug, Default)]
pub struct RuntimeArgs {
    /// Settings file (a firmware profile); layered under INFL8_* env and flags.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Backend to run on (see `infl8 plugins`), or a fallback chain
    /// `a,b,c`: the first that loads the model runs it.
    #[arg(long, value_name = "NAME[,NAME...]")]
    pub backend: Option<String>,
    /// Backend worker threads (0 = all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Windows per backend call.
    #[arg(long, value_name = "N")]
    pub batch: Option<usize>,
    /// Extra directory to search for plugins (repeatable).
    #[arg(long = "plugin-dir", value_name = "DIR")]
    pub plugin_dirs: Vec<PathBuf>,
    /// Open plugin libraries that others could have written (group- or
    /// world-writable, or in such a directory); refused by default.
    #[arg(long)]
    pub allow_insecure_plugins: bool,
}

#[derive(Args, Debug)]
pub struct SegmentArgs {
    /// ONNX model (with an infl8 manifest, or settings given as flags).
    #[arg(long, value_name = "MODEL.onnx")]
    pub model: PathBuf,
    /// Input NIfTI file, or a folder of them, or a folder holding a DICOM
    /// series (the largest one there unless `--series` names one).
    #[arg(long, value_name = "IN.nii[.gz]|DIR")]
    pub input: PathBuf,
    /// With a DICOM folder: the SeriesInstanceUID of the series to segment.
    #[arg(long, value_name = "UID")]
    pub series: Option<String>,
    /// Output label file (uint8 NIfTI), or a folder when the input is one.
    #[arg(long, value_name = "OUT.nii.gz|DIR")]
    pub output: PathBuf,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub model_flags: ModelArgs,
    #[command(flatten)]
    pub post: PostprocessArgs,
    /// Also write the blended per-class logits (float32 NIfTI, channel last).
    #[arg(long, value_name = "PATH")]
    pub save_logits: Option<PathBuf>,
    /// Refuse inputs with more voxels than this (checked from the header).
    #[arg(long)]
    pub max_voxels: Option<u64>,
    /// Write a per-volume JSON report (timings, windows, label volumes).
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,
    /// Also write a PNG preview: axial, coronal and sagittal views through
    /// the mask with the labels overlaid. A folder when the input is one
    /// (one <name>.png per input).
    #[arg(long, value_name = "OUT.png|DIR")]
    pub preview: Option<PathBuf>,
    /// Replace a symbolic link at an output path with the new file (the
    /// link's target is left alone). Without it such a link is refused.
    #[arg(long)]
    pub replace_symlinks: bool,
    /// Run each volume in a worker process, so that a plugin that aborts
    /// or hangs fails only that volume (a hang is killed at
    /// `limits.timeout_s`). `auto`: when a timeout is set.
    #[arg(long, value_enum, default_value_t = Isolation::Auto)]
    pub isolation: Isolation,
    /// Internal: run one volume as a worker process.
    #[arg(long, hide = true, value_name = "JSON")]
    pub worker_job: Option<String>,
}

/// Where `segment` runs each volume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Isolation {
    /// In a worker process when `limits.timeout_s` is set, else in this one.
    #[default]
    Auto,
    /// Always in a worker process.
    Process,
    /// Always in this process (a plugin's abort ends the command).
    Off,
}

/// Label-map clean-up flags (`segment` and `watch`).
#[derive(Args, Debug, Default)]
pub struct PostprocessArgs {
    /// Keep only the largest connected component of each label.
    #[arg(long)]
    pub largest_component: bool,
    /// Fill background enclosed by one label.
    #[arg(long)]
    pub fill_holes: bool,
    /// Skip the clean-up the model's manifest asks for.
    #[arg(long)]
    pub no_model_postprocess: bool,
}

impl PostprocessArgs {
    /// Adds the `postprocess` table the flags ask for to a config layer.
    pub fn add_to(&self, top: &mut Map<String, Value>) {
        let mut post = Map::new();
        if self.largest_component {
            put(&mut post, "largest_component", json!(true));
        }
        if self.fill_holes {
            put(&mut post, "fill_holes", json!(true));
        }
        if self.no_model_postprocess {
            put(&mut post, "ignore_model", json!(true));
        }
        if !post.is_empty() {
            put(top, "postprocess", Value::Object(post));
        }
    }
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// ONNX model.
    pub model: PathBuf,
    /// Also load the model on a backend to show the shapes it resolved.
    #[arg(long)]
    pub load: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Args, Debug)]
pub struct PluginsArgs {
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Args, Debug)]
pub struct ExampleModelArgs {
    /// Where to write the model.
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Window size the model is declared with.
    #[arg(long, num_args = 3, value_names = ["X", "Y", "Z"], default_values_t = [64usize, 64, 64])]
    pub roi: Vec<usize>,
}

fn put(map: &mut Map<String, Value>, key: &str, v: Value) {
    map.insert(key.into(), v);
}

impl RuntimeArgs {
    /// The flags the user gave, as a config layer.
    pub fn layer(&self) -> Map<String, Value> {
        let mut m = Map::new();
        if let Some(b) = &self.backend {
            put(&mut m, "backend", json!(b));
        }
        if let Some(t) = self.threads {
            put(&mut m, "threads", json!(t));
        }
        if let Some(b) = self.batch {
            put(&mut m, "window_batch", json!(b));
        }
        if !self.plugin_dirs.is_empty() {
            put(&mut m, "plugin_dirs", json!(self.plugin_dirs));
        }
        if self.allow_insecure_plugins {
            put(
                &mut m,
                "plugins",
                json!({"allow_insecure_permissions": true}),
            );
        }
        m
    }
}

impl SegmentArgs {
    pub fn layer(&self) -> Value {
        let mut top = self.runtime.layer();
        let model = self.model_flags.layer();
        if !model.is_empty() {
            put(&mut top, "model", Value::Object(model));
        }
        self.post.add_to(&mut top);
        if let Some(v) = self.max_voxels {
            put(&mut top, "limits", json!({"max_voxels": v}));
        }
        Value::Object(top)
    }
}
