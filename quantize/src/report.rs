//! What quantization did and cost, per tensor and per volume.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use crate::calibrate::Method;
use crate::plan::Excluded;
use crate::qdq::WeightReport;

#[derive(Clone, Debug, Serialize)]
pub struct ActivationReport {
    pub tensor: String,
    /// Quantized nodes reading it.
    pub nodes: Vec<String>,
    /// Largest |x| seen during calibration.
    pub amax: f32,
    /// Clipping threshold (maps to ±127); 0 leaves the tensor float.
    pub threshold: f32,
    /// Values observed.
    pub values: u64,
    /// Estimated from the calibration histogram: rounding noise inside the
    /// threshold, clipping error beyond it.
    pub sqnr_db: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub id: String,
    /// Per foreground label (label 1 first); `None` where neither map has it.
    pub dice_int8_vs_fp32: Vec<Option<f64>>,
    pub dice_fp32_vs_truth: Option<Vec<Option<f64>>>,
    pub dice_int8_vs_truth: Option<Vec<Option<f64>>>,
    /// Blended logits on the input grid, INT8 against FP32.
    pub logits_sqnr_db: Option<f64>,
    pub fp32_s: f64,
    pub int8_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub model: PathBuf,
    pub output: PathBuf,
    pub method: Method,
    pub manifest_origin: String,
    pub calibration_volumes: Vec<String>,
    pub calibration_windows: u64,
    /// No separate evaluation set was given.
    pub evaluated_on_calibration: bool,
    pub fp32_bytes: u64,
    pub int8_bytes: u64,
    pub activations: Vec<ActivationReport>,
    pub weights: Vec<WeightReport>,
    pub excluded: Vec<Excluded>,
    pub eval: Vec<EvalReport>,
    pub calibration_s: f64,
    pub evaluation_s: f64,
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for x in v {
        sum += x;
        n += 1;
    }
    (n > 0).then(|| sum / n as f64)
}

fn db(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.1}"))
}

fn dice_list(v: &[Option<f64>]) -> String {
    v.iter()
        .map(|d| d.map_or_else(|| "-".into(), |x| format!("{x:.4}")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Shortens long ONNX tensor names for the table, keeping the end (the
/// part that tells one layer from the next).
fn short(name: &str, width: usize) -> String {
    let n = name.chars().count();
    if n <= width {
        name.to_string()
    } else {
        let tail: String = name.chars().skip(n - (width - 1)).collect();
        format!("…{tail}")
    }
}

impl Report {
    /// Mean INT8-vs-FP32 Dice over volumes and foreground labels.
    pub fn mean_dice_int8_vs_fp32(&self) -> Option<f64> {
        mean(
            self.eval
                .iter()
                .flat_map(|e| e.dice_int8_vs_fp32.iter().flatten().copied()),
        )
    }

    /// The quantized tensors with the lowest SQNR, worst first.
    pub fn worst(&self, n: usize) -> Vec<(String, f64)> {
        let mut all: Vec<(String, f64)> = self
            .activations
            .iter()
            .filter_map(|a| a.sqnr_db.map(|s| (format!("activation {}", a.tensor), s)))
            .chain(
                self.weights
                    .iter()
                    .filter_map(|w| w.sqnr_db.map(|s| (format!("weight {}", w.tensor), s))),
            )
            .collect();
        all.sort_by(|a, b| a.1.total_cmp(&b.1));
        all.truncate(n);
        all
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "INT8 QDQ model {} ({:.1} MB, FP32 {:.1} MB)",
            self.output.display(),
            self.int8_bytes as f64 / 1e6,
            self.fp32_bytes as f64 / 1e6
        )?;
        writeln!(
            f,
            "calibration: {} on {} volume(s), {} windows, {:.1} s; manifest from {}",
            self.method.describe(),
            self.calibration_volumes.len(),
            self.calibration_windows,
            self.calibration_s,
            self.manifest_origin
        )?;
        writeln!(f)?;
        writeln!(f, "activations (int8 per tensor)")?;
        writeln!(
            f,
            "  {:<48} {:>10} {:>10} {:>8}",
            "tensor", "max |x|", "threshold", "SQNR dB"
        )?;
        for a in &self.activations {
            writeln!(
                f,
                "  {:<48} {:>10.4} {:>10.4} {:>8}",
                short(&a.tensor, 48),
                a.amax,
                a.threshold,
                db(a.sqnr_db)
            )?;
        }
        writeln!(f, "weights (int8 per output channel)")?;
        writeln!(
            f,
            "  {:<48} {:>10} {:>10} {:>8}",
            "tensor", "op", "channels", "SQNR dB"
        )?;
        for w in &self.weights {
            writeln!(
                f,
                "  {:<48} {:>10} {:>10} {:>8}",
                short(&w.tensor, 48),
                w.op_type,
                w.channels,
                db(w.sqnr_db)
            )?;
        }
        if !self.excluded.is_empty() {
            writeln!(f, "left in float")?;
            for e in &self.excluded {
                writeln!(
                    f,
                    "  {:<48} {:>10}  {}",
                    short(&e.node, 48),
                    e.op_type,
                    e.reason
                )?;
            }
        }
        let worst = self.worst(3);
        if !worst.is_empty() {
            writeln!(f, "lowest SQNR (where accuracy goes first)")?;
            for (name, s) in worst {
                writeln!(f, "  {s:>6.1} dB  {name}")?;
            }
        }
        writeln!(f)?;
        writeln!(
            f,
            "INT8 vs FP32 on {} (tract, {:.1} s)",
            if self.evaluated_on_calibration {
                "the calibration volumes (no held-out set given)"
            } else {
                "held-out volumes"
            },
            self.evaluation_s
        )?;
        writeln!(
            f,
            "  {:<28} {:>18} {:>12} {:>18} {:>18} {:>8} {:>8}",
            "volume",
            "Dice int8/fp32",
            "logit SQNR",
            "Dice fp32/truth",
            "Dice int8/truth",
            "fp32 s",
            "int8 s"
        )?;
        for e in &self.eval {
            let truth = |v: &Option<Vec<Option<f64>>>| {
                v.as_ref().map_or_else(|| "-".into(), |v| dice_list(v))
            };
            writeln!(
                f,
                "  {:<28} {:>18} {:>12} {:>18} {:>18} {:>8.2} {:>8.2}",
                short(&e.id, 28),
                dice_list(&e.dice_int8_vs_fp32),
                db(e.logits_sqnr_db),
                truth(&e.dice_fp32_vs_truth),
                truth(&e.dice_int8_vs_truth),
                e.fp32_s,
                e.int8_s
            )?;
        }
        if let Some(m) = self.mean_dice_int8_vs_fp32() {
            writeln!(f, "mean Dice INT8 vs FP32: {m:.4}")?;
        }
        Ok(())
    }
}
