//! `infl8-train quantize`: FP32 ONNX in, INT8 QDQ ONNX out, with the
//! per-layer report and the INT8-vs-FP32 Dice.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use infl8_core::cli_args::ModelArgs;
use infl8_quantize::{Method, Options, quantize};

use infl8_trainer::data::calib::cases_of;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MethodArg {
    Minmax,
    Percentile,
    Entropy,
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// The FP32 ONNX model.
    #[arg(long, value_name = "FP32.onnx")]
    model: PathBuf,
    /// Where to write the INT8 QDQ model.
    #[arg(long, value_name = "INT8.onnx")]
    out: PathBuf,
    /// Calibration volumes: NIfTI files, or folders (a dataset folder of
    /// <id>_image/<id>_label pairs or an MSD dataset gives its images, any
    /// other folder its .nii/.nii.gz files). Repeatable.
    #[arg(long, required = true, num_args = 1.., value_name = "PATH")]
    calib: Vec<PathBuf>,
    /// Volumes to compare INT8 with FP32 on (default: the calibration
    /// volumes, or the --holdout cases). Same forms as --calib.
    #[arg(long, num_args = 1.., value_name = "PATH")]
    eval: Vec<PathBuf>,
    /// Case ids of the --calib folders kept out of calibration and used
    /// for the comparison instead (e.g. the model's validation cases).
    #[arg(long, value_delimiter = ',', value_name = "ID,...")]
    holdout: Vec<String>,
    /// How activation ranges are chosen.
    #[arg(long, value_enum, default_value = "percentile")]
    method: MethodArg,
    /// The percentile of |x| for --method percentile.
    #[arg(long, default_value_t = 99.99)]
    percentile: f64,
    /// Nodes left in float: `first` / `last` quantizable layer, `op:TYPE`,
    /// or node names; `none` for no exclusion.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "first,last,op:Softmax,op:LayerNormalization"
    )]
    exclude: Vec<String>,
    /// Op types whose inputs are quantized.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "Conv,ConvTranspose,MatMul,Gemm"
    )]
    op_types: Vec<String>,
    /// Also write the full report as JSON.
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
    /// Windows per model call.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[command(flatten)]
    model_flags: ModelArgs,
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let method = match a.method {
        MethodArg::Minmax => Method::MinMax,
        MethodArg::Entropy => Method::Entropy,
        MethodArg::Percentile => {
            if !(a.percentile > 0.0 && a.percentile <= 100.0) {
                bail!("--percentile {} is not in (0, 100]", a.percentile);
            }
            Method::Percentile(a.percentile)
        }
    };
    let mut calib = Vec::new();
    for p in &a.calib {
        calib.extend(cases_of(p)?);
    }
    let mut eval = Vec::new();
    for p in &a.eval {
        eval.extend(cases_of(p)?);
    }
    for id in &a.holdout {
        let Some(pos) = calib.iter().position(|c| &c.id == id) else {
            bail!("--holdout {id}: no calibration case has that id");
        };
        eval.push(calib.remove(pos));
    }
    let exclude = if a.exclude.iter().any(|e| e == "none") {
        vec![]
    } else {
        a.exclude.clone()
    };
    let overrides = a
        .model_flags
        .overrides()
        .context("the model flags do not make valid settings")?;
    let opts = Options {
        method,
        op_types: a.op_types.clone(),
        exclude,
        overrides,
        window_batch: a.batch,
        threads: a.threads,
    };
    if a.out == a.model {
        bail!("--out must differ from --model: the FP32 model is read again for the comparison");
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg:>24} [{bar:30}] {pos}/{len} windows ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let report = quantize(
        &a.model,
        &a.out,
        &calib,
        &eval,
        &opts,
        &|stage, i, n, done, total| {
            bar.set_message(format!("{stage} {}/{n}", i + 1));
            bar.set_length(total);
            bar.set_position(done);
        },
    );
    bar.finish_and_clear();
    let report = report.with_context(|| format!("quantizing {}", a.model.display()))?;
    print!("{report}");
    if let Some(path) = &a.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("report: {}", path.display());
    }
    Ok(())
}
