//! `infl8-train`: import a pretrained 2D ViT, inflate it into a 3D
//! segmentation model, export it to ONNX for `infl8 segment`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::{Args, Parser, Subcommand, ValueEnum};
use infl8_core::preprocess::{Normalization, PreprocessSpec};
use infl8_trainer::assemble::{BuildOptions, build};
use infl8_trainer::checkpoint;
use infl8_trainer::export::{RuntimeSpec, export, manifest_for};
use infl8_trainer::import::{ImportOptions, load_vit2d_with, save_vit2d};
use infl8_trainer::inflate::Init;
use infl8_trainer::model::ModelShape;
use infl8_trainer::train::config::TrainConfig;
use infl8_trainer::train::{ablate, finetune};
use tracing::info;

mod degrade_cmd;
mod quantize_cmd;
mod score_cmd;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "infl8-train",
    version,
    about = "Inflate pretrained 2D ViTs into 3D segmentation models"
)]
struct Cli {
    /// burn device: flex (pure-Rust CPU, default), or ndarray, cuda, wgpu
    /// when built with the `ndarray-backend`, `cuda`, `wgpu` features.
    #[arg(long, global = true, default_value = "flex")]
    device: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Read a 2D ViT (safetensors timm/HF, PyTorch .pt/.pth, ONNX) and
    /// report what was loaded, missing and ignored; optionally save it in
    /// infl8's canonical safetensors form.
    Import(ImportArgs),
    /// Build a segmentation model from a 2D ViT: inflated encoder + decoder.
    Inflate(InflateArgs),
    /// Export a checkpoint to ONNX with its manifest, verified against tract.
    Export(ExportArgs),
    /// Fine-tune a model on a NIfTI dataset (`--config train.toml`).
    Finetune(FinetuneArgs),
    /// The ablation: the same run for several inits and seeds, Markdown table.
    Ablate(AblateArgs),
    /// Post-training INT8 static quantization (QDQ ONNX), calibrated on
    /// real volumes, with a per-layer SQNR report and INT8-vs-FP32 Dice.
    Quantize(quantize_cmd::QuantizeArgs),
    /// Write a degraded copy of a scan and its labels (thick slices, bias
    /// field and noise, field-of-view cut, resampling, storage order).
    Degrade(degrade_cmd::DegradeArgs),
    /// Dice, HD95 and volume error of a mask against a reference mask.
    Score(score_cmd::ScoreArgs),
}

#[derive(Args)]
struct AblateArgs {
    #[arg(long)]
    config: PathBuf,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "inflated,inflated-average,scratch,2d"
    )]
    inits: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    seeds: Vec<u64>,
    /// Override `train.steps`.
    #[arg(long)]
    steps: Option<usize>,
    /// Markdown report (default: <train.out>/ablation.md).
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Args)]
struct FinetuneArgs {
    /// The run's configuration (see docs/trainer.md).
    #[arg(long)]
    config: PathBuf,
    /// Override `model.init` (inflated, inflated-average, scratch, 2d).
    #[arg(long)]
    init: Option<String>,
    /// Override `train.seed`.
    #[arg(long)]
    seed: Option<u64>,
    /// Override `train.steps`.
    #[arg(long)]
    steps: Option<usize>,
    /// Override `train.out`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in the output folder from its last snapshot.
    #[arg(long)]
    resume: bool,
}

#[derive(Args)]
struct SourceArgs {
    /// Attention heads, when the file does not say (default: width / 64 rule).
    #[arg(long)]
    heads: Option<usize>,
    /// LayerNorm epsilon override.
    #[arg(long)]
    eps: Option<f64>,
}

impl SourceArgs {
    fn options(&self) -> ImportOptions {
        ImportOptions {
            heads: self.heads,
            eps: self.eps,
            prefix: None,
        }
    }
}

#[derive(Args)]
struct ImportArgs {
    /// The 2D ViT weights.
    source: PathBuf,
    /// Write the backbone as canonical safetensors here.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    src: SourceArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum ShapeArg {
    Slab,
    Volumetric,
}

#[derive(Args)]
struct InflateArgs {
    /// The 2D ViT (any format `import` reads).
    #[arg(long)]
    vit: PathBuf,
    /// Checkpoint to write (.safetensors).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "slab")]
    shape: ShapeArg,
    /// Slices per slab (slab shape).
    #[arg(long, default_value_t = 3)]
    slab_depth: usize,
    /// Slices per 3D tile (volumetric shape).
    #[arg(long, default_value_t = 16)]
    tile_depth: usize,
    /// Slices per patch (volumetric shape).
    #[arg(long, default_value_t = 4)]
    patch_depth: usize,
    /// In-plane tile X Y, multiples of the patch size.
    #[arg(long, num_args = 2, value_names = ["X", "Y"], default_values_t = [112, 112])]
    roi: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    channels: usize,
    #[arg(long, default_value_t = 2)]
    classes: usize,
    /// Decoder width at full resolution.
    #[arg(long, default_value_t = 16)]
    features: usize,
    /// Keep only the first K encoder blocks.
    #[arg(long)]
    blocks: Option<usize>,
    /// inflated (centering), inflated-average, scratch or 2d.
    #[arg(long, default_value = "inflated")]
    init: String,
    /// Seed of the decoder's (and scratch encoder's) random init.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    src: SourceArgs,
}

#[derive(Args)]
struct ExportArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Class names, background first (comma-separated). Default: the
    /// checkpoint's (fine-tuned checkpoints record them), else
    /// background,foreground.
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<String>>,
    /// Target voxel spacing in mm (X Y Z); default: the checkpoint's, else
    /// the input's.
    #[arg(long, num_args = 3, value_names = ["X", "Y", "Z"])]
    spacing: Option<Vec<f64>>,
    /// Intensity window LO HI, scaled to [0, 1].
    #[arg(long, num_args = 2, value_names = ["LO", "HI"], conflicts_with_all = ["zscore", "percentile"])]
    window: Option<Vec<f64>>,
    /// Z-score normalisation over nonzero voxels.
    #[arg(long, conflicts_with = "percentile")]
    zscore: bool,
    /// Percentile window LO HI (percent), scaled to [0, 1].
    #[arg(long, num_args = 2, value_names = ["LO", "HI"])]
    percentile: Option<Vec<f64>>,
    /// Overlap of neighbouring windows.
    #[arg(long)]
    overlap: Option<f64>,
    /// Model name for the manifest.
    #[arg(long)]
    name: Option<String>,
    /// Record in the manifest: keep each label's largest component (added
    /// to what the checkpoint records).
    #[arg(long)]
    largest_component: bool,
    /// Record in the manifest: fill holes enclosed by one label.
    #[arg(long)]
    fill_holes: bool,
}

fn device(name: &str) -> Result<Device> {
    match name {
        "flex" => Ok(Device::flex()),
        // Deprecated upstream in favour of flex; kept selectable for comparison.
        #[cfg(feature = "ndarray-backend")]
        #[allow(deprecated)]
        "ndarray" => Ok(Device::ndarray()),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Device::cuda(0)),
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
        other => {
            let mut known = vec!["flex"];
            if cfg!(feature = "ndarray-backend") {
                known.push("ndarray");
            }
            if cfg!(feature = "cuda") {
                known.push("cuda");
            }
            if cfg!(feature = "wgpu") {
                known.push("wgpu");
            }
            bail!(
                "burn device `{other}` is not compiled in (available: {}); \
                 build with `--features ndarray-backend`, `cuda` or `wgpu` for the others",
                known.join(", ")
            )
        }
    }
}

fn import(a: ImportArgs) -> Result<()> {
    let (vit, report) = load_vit2d_with(&a.source, &a.src.options())?;
    println!("{report}");
    if let Some(out) = a.out {
        save_vit2d(&out, &vit)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

fn inflate(a: InflateArgs, device: &Device) -> Result<()> {
    let (vit, report) = load_vit2d_with(&a.vit, &a.src.options())?;
    info!(source = %a.vit.display(), loaded = report.loaded.len(), "2D ViT read");
    let init = Init::parse(&a.init)?;
    let shape = match a.shape {
        ShapeArg::Slab => ModelShape::Slab {
            depth: a.slab_depth,
        },
        ShapeArg::Volumetric => ModelShape::Volumetric {
            tile_depth: a.tile_depth,
            patch_depth: a.patch_depth,
        },
    };
    let opts = BuildOptions {
        shape,
        roi_hw: [a.roi[0], a.roi[1]],
        in_channels: a.channels,
        classes: a.classes,
        features: a.features,
        blocks: a.blocks,
        init,
    };
    device.seed(a.seed);
    let mut model = build(&vit, &opts, device)?;
    model.config.source = a.vit.display().to_string();
    checkpoint::save(&model, &a.out)?;
    let c = &model.config;
    println!(
        "wrote {}: {} encoder ({} of {} blocks, width {}, patch {}x{}x{}), {:?}, in-plane tile {:?}, taps {:?}, decoder levels {:?}",
        a.out.display(),
        init.name(),
        c.vit.depth,
        vit.config.depth,
        c.vit.width,
        c.shape.patch_depth(),
        c.vit.patch,
        c.vit.patch,
        c.shape,
        c.roi_hw(),
        c.taps,
        c.factors_hw
    );
    Ok(())
}

fn export_cmd(a: ExportArgs, device: &Device) -> Result<()> {
    let model = checkpoint::load(&a.checkpoint, device)?;
    // Start from what fine-tuning recorded; flags override it piece by piece.
    let recorded = checkpoint::read_manifest(&a.checkpoint)?;
    let base = recorded.as_ref();
    let normalization = match (&a.window, a.zscore, &a.percentile) {
        (Some(w), _, _) => Normalization::IntensityWindow { lo: w[0], hi: w[1] },
        (_, true, _) => Normalization::Zscore { nonzero: true },
        (_, _, Some(p)) => Normalization::Percentile { lo: p[0], hi: p[1] },
        _ => base
            .map(|m| m.preprocess.normalization)
            .unwrap_or(Normalization::None),
    };
    let target_spacing = match &a.spacing {
        Some(s) => Some([s[0], s[1], s[2]]),
        None => base.and_then(|m| m.preprocess.target_spacing),
    };
    let labels = a
        .labels
        .clone()
        .or_else(|| base.map(|m| m.labels.clone()))
        .unwrap_or_else(|| vec!["background".into(), "foreground".into()]);
    let recorded_overlap = base.map(|m| match &m.inference {
        infl8_core::manifest::InferenceMode::SlidingWindow(s) => s.overlap,
        infl8_core::manifest::InferenceMode::Slab(s) => s.overlap,
    });
    let spec = RuntimeSpec {
        name: a.name.clone().or_else(|| base.and_then(|m| m.name.clone())),
        labels,
        preprocess: PreprocessSpec {
            reorient: true,
            target_spacing,
            normalization,
        },
        overlap: a.overlap.or(recorded_overlap).unwrap_or(0.5),
        postprocess: base.map(|m| m.postprocess).unwrap_or_default().union(
            infl8_core::manifest::Postprocessing {
                largest_component: a.largest_component,
                fill_holes: a.fill_holes,
            },
        ),
    };
    let manifest = manifest_for(&model, &spec).map_err(anyhow::Error::msg)?;
    let diff = export(&model, &manifest, &a.out)
        .with_context(|| format!("exporting {}", a.checkpoint.display()))?;
    println!(
        "wrote {} (tract vs burn max abs diff {diff:.2e}); manifest {}",
        a.out.display(),
        manifest.to_json()
    );
    Ok(())
}

fn finetune_cmd(a: FinetuneArgs) -> Result<()> {
    let mut cfg = TrainConfig::load(&a.config)?;
    if let Some(init) = a.init {
        cfg.model.init = init;
    }
    if let Some(seed) = a.seed {
        cfg.train.seed = seed;
    }
    if let Some(steps) = a.steps {
        cfg.train.steps = steps;
    }
    if let Some(out) = a.out {
        cfg.train.out = out;
    }
    cfg.check().map_err(anyhow::Error::msg)?;
    let dev = device(&cfg.train.device)?;
    let s = if a.resume {
        infl8_trainer::train::resume(&cfg, &dev, true)?
    } else {
        finetune(&cfg, &dev, true)?
    };
    println!(
        "{} steps in {:.0} s: loss {:.4} -> {:.4}, best validation Dice {:.4} at step {} ({}), last {:.4}",
        s.steps,
        s.seconds,
        s.first_loss,
        s.last_loss,
        s.best_dice,
        s.best_step,
        s.best_checkpoint.display(),
        s.last_dice
    );
    Ok(())
}

fn ablate_cmd(a: AblateArgs) -> Result<()> {
    let mut cfg = TrainConfig::load(&a.config)?;
    if let Some(steps) = a.steps {
        cfg.train.steps = steps;
    }
    for init in &a.inits {
        Init::parse(init)?;
    }
    let dev = device(&cfg.train.device)?;
    let results = ablate::ablate(&cfg, &a.inits, &a.seeds, &dev, true)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let md = ablate::report(&results, &cfg, &command);
    let path = a
        .report
        .unwrap_or_else(|| ablate::default_report_path(&cfg));
    std::fs::write(&path, &md).with_context(|| format!("cannot write {}", path.display()))?;
    let png = path.with_extension("png");
    ablate::plot(&results, &png)?;
    let json = path.with_extension("json");
    std::fs::write(&json, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("cannot write {}", json.display()))?;
    println!(
        "{md}\nwrote {}, {} and {}",
        path.display(),
        png.display(),
        json.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = device(&cli.device).and_then(|d| match cli.command {
        Command::Import(a) => import(a),
        Command::Inflate(a) => inflate(a, &d),
        Command::Export(a) => export_cmd(a, &d),
        Command::Finetune(a) => finetune_cmd(a),
        Command::Ablate(a) => ablate_cmd(a),
        Command::Quantize(a) => quantize_cmd::run(a),
        Command::Degrade(a) => degrade_cmd::run(a),
        Command::Score(a) => score_cmd::run(a),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
