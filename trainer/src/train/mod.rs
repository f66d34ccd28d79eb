//! Fine-tuning: sample windows from a NIfTI dataset, Dice + CE, AdamW with
//! warmup and decay, gradient clipping, validation through the runtime's own
//! inference, best/last checkpoints, metrics CSV.

pub mod ablate;
pub mod config;
pub mod loss;
pub mod plot;
pub mod runtime_model;
pub mod sample;
pub mod variants;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use infl8_core::nifti_io::{self, ReadLimits};
use infl8_core::segment::Segmenter;
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::assemble::{BuildOptions, build};
use crate::checkpoint;
use crate::data::{Case, Dataset, open_dataset, prepare, split};
use crate::export::{RuntimeSpec, manifest_for};
use crate::import::{ImportOptions, load_vit2d_with};
use crate::inflate::Init;
use crate::model::SegModel;
use config::{TrainConfig, learning_rate};
use loss::{dice_ce, hard_dice};
use runtime_model::BurnModel;
use sample::{Rng, Sampler, TrainCase};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    #[error("{0}")]
    Dataset(#[from] crate::data::DatasetError),
    #[error("{0}")]
    Import(#[from] crate::import::ImportError),
    #[error("{0}")]
    Build(#[from] crate::assemble::BuildError),
    #[error("{0}")]
    Inflate(#[from] crate::inflate::InflateError),
    #[error("{0}")]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("validation of {case}: {detail}")]
    Validation { case: String, detail: String },
    #[error("{}: {detail}", .path.display())]
    Output { path: PathBuf, detail: String },
    #[error("training: {0}")]
    Other(String),
}

/// One validation: per-class Dice per volume (background excluded) and
/// their mean over volumes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Validation {
    pub step: usize,
    /// `[volume][class-1]`; NaN where a class is absent from both.
    pub per_volume: Vec<(String, Vec<f64>)>,
    /// Mean over volumes and foreground classes.
    pub mean_dice: f64,
}

/// What a run reports at the end.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: usize,
    /// The step a resumed run started from (0 for a fresh run).
    pub resumed_from: usize,
    pub best_step: usize,
    pub best_dice: f64,
    pub last_dice: f64,
    pub first_loss: f64,
    pub last_loss: f64,
    pub seconds: f64,
    pub train_cases: Vec<String>,
    pub validation_cases: Vec<String>,
    pub best_checkpoint: PathBuf,
}

fn out_err(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Output {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// Labels of a NIfTI label file as u8 (values must be small integers).
fn read_labels(path: &Path, limits: &ReadLimits) -> Result<Vec<u8>, TrainError> {
    let v = nifti_io::read_volume(path, limits).map_err(|e| TrainError::Validation {
        case: path.display().to_string(),
        detail: e.to_string(),
    })?;
    let data = v.data.as_standard_layout();
    Ok(data
        .iter()
        .map(|&x| x.round().clamp(0.0, 255.0) as u8)
        .collect())
}

struct ValCase {
    id: String,
    path: PathBuf,
    image: infl8_core::Volume,
    label: Vec<u8>,
}

fn validate(
    model: &SegModel,
    device: &Device,
    spec: &RuntimeSpec,
    cases: &[ValCase],
    step: usize,
) -> Result<Validation, TrainError> {
    let manifest = manifest_for(model, spec).map_err(TrainError::Other)?;
    let classes = model.config.classes;
    let segmenter = Segmenter::new(
        Box::new(BurnModel::new(model.clone(), device.clone())),
        manifest,
        4,
    );
    let mut per_volume = Vec::new();
    let mut all = Vec::new();
    for c in cases {
        let seg = segmenter
            .segment(&c.image, &c.path, false, &|_, _| {})
            .map_err(|e| TrainError::Validation {
                case: c.id.clone(),
                detail: e.to_string(),
            })?;
        let pred: Vec<u8> = seg.labels.as_standard_layout().iter().copied().collect();
        let dice: Vec<f64> = (1..classes)
            .map(|k| hard_dice(&pred, &c.label, k as u8).unwrap_or(f64::NAN))
            .collect();
        all.extend(dice.iter().copied().filter(|d| !d.is_nan()));
        per_volume.push((c.id.clone(), dice));
    }
    let mean_dice = if all.is_empty() {
        f64::NAN
    } else {
        all.iter().sum::<f64>() / all.len() as f64
    };
    Ok(Validation {
        step,
        per_volume,
        mean_dice,
    })
}

fn batch_tensors(
    sampler: &Sampler,
    cases: &[TrainCase],
    batch: usize,
    rng: &mut Rng,
    device: &Device,
) -> (Tensor<5>, Tensor<5>) {
    let channels = cases[0].image.dim().0;
    let mut xs = Vec::with_capacity(batch * sampler.input_len(channels));
    let mut ys = Vec::with_capacity(batch * sampler.target_len());
    for _ in 0..batch {
        let case = &cases[rng.below(cases.len())];
        let s = sampler.sample(case, rng);
        xs.extend(s.x);
        ys.extend(s.y);
    }
    let [rx, ry] = sampler.roi;
    let (xd, yd) = match sampler.shape {
        crate::model::ModelShape::Slab { depth } => (
            [batch, channels, depth, rx, ry],
            [batch, sampler.classes, 1, rx, ry],
        ),
        crate::model::ModelShape::Volumetric { tile_depth, .. } => (
            [batch, channels, rx, ry, tile_depth],
            [batch, sampler.classes, rx, ry, tile_depth],
        ),
    };
    (
        Tensor::from_data(TensorData::new(xs, xd), device),
        Tensor::from_data(TensorData::new(ys, yd), device),
    )
}

/// Runs a fine-tuning job described by `cfg` on `device` (an autodiff
/// device is made from it). `init` overrides the config's init (ablation).
pub fn finetune(
    cfg: &TrainConfig,
    device: &Device,
    show_progress: bool,
) -> Result<TrainSummary, TrainError> {
    run(cfg, device, show_progress, false)
}

/// Continues the run in `cfg.train.out` from its last saved state (model,
/// optimizer moments, sampling RNG, step): the result equals an
/// uninterrupted run. Starts afresh when there is no saved state.
pub fn resume(
    cfg: &TrainConfig,
    device: &Device,
    show_progress: bool,
) -> Result<TrainSummary, TrainError> {
    run(cfg, device, show_progress, true)
}

/// Everything besides weights and optimizer moments that a resumed run
/// needs to continue exactly.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TrainState {
    step: usize,
    rng: Rng,
    best_dice: f64,
    best_step: usize,
    last_dice: f64,
    first_loss: f64,
    last_loss: f64,
    validations: Vec<Validation>,
    /// The run's configuration, to refuse resuming a different run.
    config: TrainConfig,
}

/// Pointer to the latest complete resume snapshot; replaced atomically
/// (write + rename) only after the snapshot's files are all written, so a
/// crash at any moment leaves the previous snapshot usable.
const RESUME_POINTER: &str = "resume.json";

fn save_snapshot(
    out: &Path,
    model: &SegModel,
    optim: &burn::optim::ModuleOptimizer,
    state: &TrainState,
) -> Result<(), TrainError> {
    let dir = out.join(format!("resume-{:08}", state.step));
    std::fs::create_dir_all(&dir).map_err(out_err(&dir))?;
    checkpoint::save(model, &dir.join("model.safetensors"))?;
    let opt_path = dir.join("optim.bpk");
    optim
        .to_record()
        .save(&opt_path)
        .map_err(|e| TrainError::Output {
            path: opt_path.clone(),
            detail: format!("{e:?}"),
        })?;
    let st_path = dir.join("state.json");
    let json = serde_json::to_string(state).map_err(|e| TrainError::Other(e.to_string()))?;
    std::fs::write(&st_path, json).map_err(out_err(&st_path))?;
    let pointer = out.join(RESUME_POINTER);
    let tmp = out.join(format!("{RESUME_POINTER}.part"));
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::fs::write(&tmp, serde_json::json!({ "snapshot": name }).to_string())
        .map_err(out_err(&tmp))?;
    std::fs::rename(&tmp, &pointer).map_err(out_err(&pointer))?;
    // Older snapshots are no longer needed.
    if let Ok(entries) = std::fs::read_dir(out) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("resume-") && n != name {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(())
}

type Snapshot = (SegModel, burn::optim::OptimizerRecord, TrainState);

fn load_snapshot(out: &Path, device: &Device) -> Result<Option<Snapshot>, TrainError> {
    let pointer = out.join(RESUME_POINTER);
    let text = match std::fs::read_to_string(&pointer) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(out_err(&pointer)(e)),
    };
    let bad = |detail: String| TrainError::Output {
        path: pointer.clone(),
        detail,
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let name = v["snapshot"]
        .as_str()
        .ok_or_else(|| bad("no `snapshot` entry".into()))?;
    let dir = out.join(name);
    let model = crate::model::with_stable_param_ids(checkpoint::load(
        &dir.join("model.safetensors"),
        device,
    )?);
    let opt_path = dir.join("optim.bpk");
    let record = burn::optim::OptimizerRecord::load(&opt_path).map_err(|e| TrainError::Output {
        path: opt_path.clone(),
        detail: format!("{e:?}"),
    })?;
    let st_path = dir.join("state.json");
    let text = std::fs::read_to_string(&st_path).map_err(out_err(&st_path))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| TrainError::Output {
        path: st_path.clone(),
        detail: e.to_string(),
    })?;
    Ok(Some((model, record, state)))
}

/// Splits off the named cases (second) from the rest (first); every name
/// must exist, so a typo cannot silently train on a held-out subject.
fn split_by_id(
    cases: &[Case],
    names: &[String],
    key: &str,
    dir: &Path,
) -> Result<(Vec<Case>, Vec<Case>), TrainError> {
    if let Some(missing) = names.iter().find(|n| !cases.iter().any(|c| &c.id == *n)) {
        let known: Vec<&str> = cases.iter().map(|c| c.id.as_str()).collect();
        return Err(TrainError::Other(format!(
            "{}: data.{key} names {missing:?}, which is not a case (cases: {})",
            dir.display(),
            known.join(", ")
        )));
    }
    Ok(cases.iter().cloned().partition(|c| !names.contains(&c.id)))
}

fn run(
    cfg: &TrainConfig,
    device: &Device,
    show_progress: bool,
    resume: bool,
) -> Result<TrainSummary, TrainError> {
    let started = Instant::now();
    let t = &cfg.train;
    std::fs::create_dir_all(&t.out).map_err(out_err(&t.out))?;
    let limits = ReadLimits::default();

    // Data: the same preprocessing code as inference.
    let dataset = open_dataset(&cfg.data.dir)?;
    let (usable, _) = split_by_id(
        dataset.cases(),
        &cfg.data.held_out_cases,
        "held_out_cases",
        &cfg.data.dir,
    )?;
    let (train_cases, val_cases) = if cfg.data.validation_cases.is_empty() {
        split(&usable, cfg.data.validation_fraction, cfg.data.split_seed)
    } else {
        split_by_id(
            &usable,
            &cfg.data.validation_cases,
            "validation_cases",
            &cfg.data.dir,
        )?
    };
    if train_cases.is_empty() {
        return Err(TrainError::Other(format!(
            "{}: no training cases after the split",
            cfg.data.dir.display()
        )));
    }
    let labels = dataset.labels().to_vec();
    let classes = labels.len();
    info!(
        train = train_cases.len(),
        validation = val_cases.len(),
        classes,
        "dataset"
    );
    let mut train: Vec<TrainCase> = Vec::new();
    for c in &train_cases {
        train.extend(load_case(dataset.as_ref(), c, cfg, &limits)?);
    }
    let val: Vec<ValCase> = val_cases
        .iter()
        .map(|c| {
            let image =
                nifti_io::read_volume(&c.image, &limits).map_err(|e| TrainError::Validation {
                    case: c.id.clone(),
                    detail: e.to_string(),
                })?;
            Ok(ValCase {
                id: c.id.clone(),
                path: c.image.clone(),
                image,
                label: read_labels(&c.label, &limits)?,
            })
        })
        .collect::<Result<_, TrainError>>()?;

    // Model.
    let (vit, _) = load_vit2d_with(
        &cfg.model.vit,
        &ImportOptions {
            heads: cfg.model.heads,
            ..Default::default()
        },
    )?;
    let init = Init::parse(&cfg.model.init)?;
    let device = device.clone().autodiff();
    device.seed(t.seed);
    let opts = BuildOptions {
        shape: cfg.model.shape.clone(),
        roi_hw: cfg.model.roi,
        in_channels: train[0].image.dim().0,
        classes,
        features: cfg.model.features,
        blocks: cfg.model.blocks,
        init,
    };
    let mut model = crate::model::with_stable_param_ids(build(&vit, &opts, &device)?);
    model.config.source = cfg.model.vit.display().to_string();
    let spec = RuntimeSpec {
        name: Some(format!("infl8-{}", init.name())),
        labels: labels.clone(),
        preprocess: cfg.preprocess.clone(),
        overlap: 0.5,
        postprocess: cfg.postprocess,
    };
    let manifest = manifest_for(&model, &spec).map_err(TrainError::Other)?;

    let mut optim: burn::optim::ModuleOptimizer = {
        let mut c = AdamWConfig::new().with_weight_decay(t.weight_decay as f32);
        if t.clip > 0.0 {
            c = c.with_grad_clipping(Some(GradientClippingConfig::Norm(t.clip as f32)));
        }
        c.init()
    };
    let sampler = Sampler {
        shape: model.config.shape.clone(),
        roi: cfg.model.roi,
        classes,
        fg_prob: t.fg_prob,
        edge_prob: t.edge_prob,
        // Cases are resampled to the target spacing; without one, 1 mm is
        // the nominal slice for `fov_cut_mm`.
        slice_mm: cfg.preprocess.target_spacing.map_or(1.0, |s| s[2]),
        augment: t.augment.clone(),
    };
    let mut rng = Rng::new(t.seed);
    let mut start = 0;
    let (mut best_dice, mut best_step, mut last_dice) = (f64::NEG_INFINITY, 0, f64::NAN);
    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
    let mut validations = Vec::new();
    let csv_path = t.out.join("metrics.csv");
    let mut kept_rows = Vec::new();
    if resume && let Some((m, record, state)) = load_snapshot(&t.out, &device)? {
        // Anything that shapes the run (the schedule's length, the
        // variants, the preprocessing) must match, or the result would
        // not be the uninterrupted run's; only the output folder may be
        // spelt differently.
        let mut saved = state.config.clone();
        saved.train.out.clone_from(&t.out);
        if saved.model != cfg.model
            || saved.data != cfg.data
            || saved.preprocess != cfg.preprocess
            || saved.train != cfg.train
        {
            return Err(TrainError::Other(format!(
                "{}: the saved run used a different configuration; resume it with its own \
                 (see the snapshot's state), or use another output folder",
                t.out.display()
            )));
        }
        model = m;
        optim = optim.load_record(record);
        start = state.step;
        rng = state.rng;
        (best_dice, best_step, last_dice) = (state.best_dice, state.best_step, state.last_dice);
        (first_loss, last_loss) = (state.first_loss, state.last_loss);
        validations = state.validations;
        // Keep the metrics up to the snapshot; later rows are redone.
        if let Ok(old) = std::fs::read_to_string(&csv_path) {
            kept_rows = old
                .lines()
                .skip(1)
                .filter(|l| {
                    l.split(',')
                        .next()
                        .and_then(|v| v.parse::<usize>().ok())
                        .is_some_and(|step| step <= start)
                })
                .map(str::to_string)
                .collect();
        }
        info!(step = start, "resumed");
    }

    let mut csv = std::fs::File::create(&csv_path).map_err(out_err(&csv_path))?;
    writeln!(csv, "step,lr,loss,ce,dice_loss,val_dice").map_err(out_err(&csv_path))?;
    let mut loss_history: Vec<(f64, f64)> = Vec::new();
    for row in &kept_rows {
        writeln!(csv, "{row}").map_err(out_err(&csv_path))?;
        let mut cells = row.split(',');
        if let (Some(st), Some(l)) = (cells.next(), cells.nth(1))
            && let (Ok(st), Ok(l)) = (st.parse::<f64>(), l.parse::<f64>())
        {
            loss_history.push((st, l));
        }
    }
    let plot_path = t.out.join("metrics.png");
    let draw = |loss: &[(f64, f64)], vals: &[Validation]| {
        let dice: Vec<(f64, f64)> = vals.iter().map(|v| (v.step as f64, v.mean_dice)).collect();
        if let Err(e) = plot::plot_run(&plot_path, loss, &dice) {
            tracing::warn!("{e}");
        }
    };
    let bar = if show_progress {
        ProgressBar::new(t.steps as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    let best_path = t.out.join("best.safetensors");
    let last_path = t.out.join("last.safetensors");
    bar.set_position(start as u64);
    for step in start..t.steps {
        let lr = learning_rate(t, step);
        let (x, y) = batch_tensors(&sampler, &train, t.batch, &mut rng, &device);
        let logits = model.forward(x);
        let (loss, ce, dl) = dice_ce(logits, y);
        let value = f64::from(ce + dl);
        if !value.is_finite() {
            return Err(TrainError::Other(format!(
                "the loss became {value} at step {step}"
            )));
        }
        if step == 0 {
            first_loss = value;
        }
        last_loss = value;
        loss_history.push(((step + 1) as f64, value));
        let mut grads = loss.backward();
        match t.encoder_lr {
            // Two steps over disjoint parameters: AdamW moves only what has
            // a gradient, so each group gets its own rate (and its own clip).
            Some(encoder_lr) => {
                let encoder = GradientsParams::from_module(&mut grads, &model.encoder);
                let decoder = GradientsParams::from_module(&mut grads, &model.decoder);
                model = optim.step(lr * encoder_lr / t.lr, model, encoder);
                model = optim.step(lr, model, decoder);
            }
            None => {
                let grads = GradientsParams::from_grads(grads, &model);
                model = optim.step(lr, model, grads);
            }
        }

        let validate_now = (step + 1) % t.val_every == 0 || step + 1 == t.steps;
        let mut val_cell = String::new();
        if validate_now && !val.is_empty() {
            let v = validate(&model, &device, &spec, &val, step + 1)?;
            last_dice = v.mean_dice;
            val_cell = format!("{:.5}", v.mean_dice);
            if v.mean_dice > best_dice {
                best_dice = v.mean_dice;
                best_step = step + 1;
                checkpoint::save_with_manifest(&model, &best_path, Some(&manifest))?;
            }
            info!(step = step + 1, dice = v.mean_dice, "validation");
            validations.push(v);
            draw(&loss_history, &validations);
        }
        writeln!(
            csv,
            "{},{lr:.3e},{value:.5},{ce:.5},{dl:.5},{val_cell}",
            step + 1
        )
        .map_err(out_err(&csv_path))?;
        if (step + 1) % t.val_every == 0 && step + 1 < t.steps {
            csv.flush().map_err(out_err(&csv_path))?;
            let state = TrainState {
                step: step + 1,
                rng: rng.clone(),
                best_dice,
                best_step,
                last_dice,
                first_loss,
                last_loss,
                validations: validations.clone(),
                config: cfg.clone(),
            };
            save_snapshot(&t.out, &model, &optim, &state)?;
        }
        bar.set_message(format!("loss {value:.4} dice {last_dice:.3}"));
        bar.inc(1);
    }
    bar.finish();
    draw(&loss_history, &validations);
    checkpoint::save_with_manifest(&model, &last_path, Some(&manifest))?;
    if val.is_empty() {
        checkpoint::save_with_manifest(&model, &best_path, Some(&manifest))?;
        best_step = t.steps;
    }
    let summary = TrainSummary {
        steps: t.steps,
        resumed_from: start,
        best_step,
        best_dice,
        last_dice,
        first_loss,
        last_loss,
        seconds: started.elapsed().as_secs_f64(),
        train_cases: train_cases.iter().map(|c| c.id.clone()).collect(),
        validation_cases: val_cases.iter().map(|c| c.id.clone()).collect(),
        best_checkpoint: best_path,
    };
    let vpath = t.out.join("validation.json");
    std::fs::write(
        &vpath,
        serde_json::to_string_pretty(&(&summary, &validations)).unwrap_or_default(),
    )
    .map_err(out_err(&vpath))?;
    Ok(summary)
}

/// A training case and its acquisition variants, preprocessed.
fn load_case(
    dataset: &dyn Dataset,
    case: &Case,
    cfg: &TrainConfig,
    limits: &ReadLimits,
) -> Result<Vec<TrainCase>, TrainError> {
    let stored = dataset.read(case, limits)?;
    let v = &cfg.train.variants;
    let mut out = Vec::with_capacity(1 + v.per_case);
    for index in 0..v.per_case {
        let variant = v
            .make(&stored, index, cfg.train.seed ^ stable_hash(&case.id))
            .map_err(|e| TrainError::Other(format!("{}: a variant: {e}", case.image.display())))?;
        let p = prepare(variant, &cfg.preprocess)?;
        out.push(TrainCase::new(p.id, p.image.data, p.label));
    }
    let p = prepare(stored, &cfg.preprocess)?;
    out.push(TrainCase::new(p.id, p.image.data, p.label));
    info!(case = %case.id, variants = v.per_case, "loaded");
    Ok(out)
}

/// FNV-1a: a seed from a case id that no Rust version changes.
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
