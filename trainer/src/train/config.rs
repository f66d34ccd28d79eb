//! `train.toml`: everything a fine-tuning run depends on, so a run is
//! reproduced from its file alone.

use std::path::{Path, PathBuf};

use infl8_core::preprocess::PreprocessSpec;
use serde::{Deserialize, Serialize};

use crate::model::ModelShape;
use crate::train::sample::Augment;
use crate::train::variants::Variants;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub data: DataConfig,
    pub model: ModelConfig,
    #[serde(default)]
    pub preprocess: PreprocessSpec,
    /// Label clean-up recorded in the manifest; validation applies it too,
    /// so the reported Dice is what `infl8 segment` users get.
    #[serde(default)]
    pub postprocess: infl8_core::manifest::Postprocessing,
    pub train: LoopConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// MSD folder (dataset.json) or a folder of `*_image` / `*_label` pairs.
    pub dir: PathBuf,
    #[serde(default = "default_val_fraction")]
    pub validation_fraction: f64,
    #[serde(default)]
    pub split_seed: u64,
    /// Case ids held out for validation, instead of a seeded random
    /// fraction: with a few related cases (templates built from
    /// overlapping subjects) the held-out ones must be chosen, not drawn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub validation_cases: Vec<String>,
    /// Case ids kept out of training and out of checkpoint selection: the
    /// scans a model is reported on, and copies of a head already used
    /// (one head counted once). The trainer never reads them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_out_cases: Vec<String>,
}

fn default_val_fraction() -> f64 {
    0.2
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The pretrained 2D ViT (any format `infl8-train import` reads).
    pub vit: PathBuf,
    pub shape: ModelShape,
    /// In-plane tile.
    pub roi: [usize; 2],
    #[serde(default)]
    pub blocks: Option<usize>,
    #[serde(default = "default_features")]
    pub features: usize,
    /// inflated, inflated-average, scratch, 2d.
    #[serde(default = "default_init")]
    pub init: String,
    #[serde(default)]
    pub heads: Option<usize>,
}

fn default_features() -> usize {
    16
}

fn default_init() -> String {
    "inflated".into()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    Linear,
    Cosine,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopConfig {
    pub steps: usize,
    #[serde(default = "default_batch")]
    pub batch: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Peak learning rate of the pretrained encoder, when it should move
    /// slower than the new decoder (TransSeg: 10x lower); `lr` if unset.
    /// The warm-up and decay scale both alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_lr: Option<f64>,
    #[serde(default)]
    pub warmup: usize,
    #[serde(default = "default_decay")]
    pub decay: Decay,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    /// Gradient norm clip (0: off).
    #[serde(default = "default_clip")]
    pub clip: f64,
    #[serde(default)]
    pub seed: u64,
    /// Validate every N steps (and after the last).
    #[serde(default = "default_val_every")]
    pub val_every: usize,
    #[serde(default = "default_fg_prob")]
    pub fg_prob: f64,
    /// Probability that a window is centred in the head's lowest or
    /// highest quarter (skull base and neck, vertex).
    #[serde(default)]
    pub edge_prob: f64,
    #[serde(default)]
    pub augment: Augment,
    #[serde(default)]
    pub variants: Variants,
    /// Where checkpoints, metrics and plots go.
    pub out: PathBuf,
    /// burn device (flex, ndarray, cuda, wgpu).
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_batch() -> usize {
    2
}
fn default_lr() -> f64 {
    3e-4
}
fn default_decay() -> Decay {
    Decay::Cosine
}
fn default_wd() -> f64 {
    1e-4
}
fn default_clip() -> f64 {
    1.0
}
fn default_val_every() -> usize {
    100
}
fn default_fg_prob() -> f64 {
    0.5
}
fn default_device() -> String {
    "flex".into()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {detail}", .path.display())]
    Read { path: PathBuf, detail: String },
    #[error("{}: {detail}", .path.display())]
    Invalid { path: PathBuf, detail: String },
}

impl TrainConfig {
    /// Reads a config; relative paths are taken from the config's folder.
    pub fn load(path: &Path) -> Result<TrainConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        let mut cfg: TrainConfig = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.data.dir, &mut cfg.model.vit, &mut cfg.train.out] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        cfg.check().map_err(|detail| ConfigError::Invalid {
            path: path.to_path_buf(),
            detail,
        })?;
        Ok(cfg)
    }

    pub fn check(&self) -> Result<(), String> {
        let t = &self.train;
        if t.steps == 0 || t.batch == 0 || t.val_every == 0 {
            return Err("train.steps, train.batch and train.val_every must be positive".into());
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return Err(format!("train.lr must be positive, got {}", t.lr));
        }
        if let Some(e) = t.encoder_lr
            && !(e > 0.0 && e.is_finite())
        {
            return Err(format!("train.encoder_lr must be positive, got {e}"));
        }
        t.variants.check()?;
        let data = &self.data;
        if let Some(both) = data
            .validation_cases
            .iter()
            .find(|c| data.held_out_cases.contains(c))
        {
            return Err(format!(
                "data: {both:?} is both a validation case (used to pick the checkpoint) \
                 and held out (never used)"
            ));
        }
        if !(0.0..=1.0).contains(&t.edge_prob) {
            return Err(format!(
                "train.edge_prob must be in [0, 1], got {}",
                t.edge_prob
            ));
        }
        if !(t.augment.gamma >= 0.0 && t.augment.fov_cut_mm >= 0.0) {
            return Err("train.augment.gamma and fov_cut_mm must be >= 0".into());
        }
        if !(0.0..=1.0).contains(&t.fg_prob) {
            return Err(format!(
                "train.fg_prob must be in [0, 1], got {}",
                t.fg_prob
            ));
        }
        if !(0.0..1.0).contains(&self.data.validation_fraction) {
            return Err("data.validation_fraction must be in [0, 1)".into());
        }
        let z = t.augment.zoom;
        if !(z[0] > 0.0 && z[1] >= z[0]) {
            return Err(format!(
                "train.augment.zoom must be an increasing positive range, got {z:?}"
            ));
        }
        Ok(())
    }
}

/// Learning rate at `step` (0-based): linear warmup to `lr`, then linear or
/// cosine decay to zero at `steps`.
pub fn learning_rate(t: &LoopConfig, step: usize) -> f64 {
    if step < t.warmup {
        return t.lr * (step + 1) as f64 / t.warmup as f64;
    }
    let span = (t.steps - t.warmup).max(1) as f64;
    let p = ((step - t.warmup) as f64 / span).clamp(0.0, 1.0);
    match t.decay {
        Decay::Linear => t.lr * (1.0 - p),
        Decay::Cosine => t.lr * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loop_cfg(decay: Decay) -> LoopConfig {
        toml::from_str::<LoopConfig>(&format!(
            "steps = 110\nwarmup = 10\nlr = 1.0\nout = \"x\"\ndecay = \"{}\"",
            match decay {
                Decay::Linear => "linear",
                Decay::Cosine => "cosine",
            }
        ))
        .unwrap()
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let t = loop_cfg(Decay::Cosine);
        assert!((learning_rate(&t, 0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&t, 9) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&t, 10) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&t, 60) - 0.5).abs() < 1e-12);
        assert!(learning_rate(&t, 109) < 0.01);
        let l = loop_cfg(Decay::Linear);
        assert!((learning_rate(&l, 60) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e =
            toml::from_str::<LoopConfig>("steps = 1\nout = \"x\"\nlearning_rate = 3").unwrap_err();
        assert!(e.to_string().contains("learning_rate"), "{e}");
    }
}
