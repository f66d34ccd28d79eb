//! The paper's ablation: the same data, steps and seeds for each encoder
//! initialisation; a Markdown table of validation Dice (mean ± sd over
//! seeds).

use std::fmt::Write as _;
use std::path::PathBuf;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::{TrainError, TrainSummary, finetune};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArmResult {
    pub init: String,
    pub seed: u64,
    pub summary: TrainSummary,
}

/// Runs every (init, seed) pair; each run writes under
/// `<train.out>/<init>-seed<seed>/`.
pub fn ablate(
    base: &TrainConfig,
    inits: &[String],
    seeds: &[u64],
    device: &Device,
    show_progress: bool,
) -> Result<Vec<ArmResult>, TrainError> {
    let mut out = Vec::new();
    for init in inits {
        for &seed in seeds {
            let mut cfg = base.clone();
            cfg.model.init = init.clone();
            cfg.train.seed = seed;
            cfg.train.out = base.train.out.join(format!("{init}-seed{seed}"));
            tracing::info!(init, seed, "ablation arm");
            let summary = finetune(&cfg, device, show_progress)?;
            out.push(ArmResult {
                init: init.clone(),
                seed,
                summary,
            });
        }
    }
    Ok(out)
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let sd = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (m, sd)
}

/// The Markdown report: one row per init, best and final validation Dice
/// as mean ± sample sd over seeds.
pub fn report(results: &[ArmResult], config: &TrainConfig, command: &str) -> String {
    let mut inits: Vec<&str> = Vec::new();
    for r in results {
        if !inits.contains(&r.init.as_str()) {
            inits.push(&r.init);
        }
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| init | seeds | best validation Dice | final validation Dice | final training loss |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- |");
    for init in inits {
        let arm: Vec<&ArmResult> = results.iter().filter(|r| r.init == init).collect();
        let best: Vec<f64> = arm.iter().map(|r| r.summary.best_dice).collect();
        let last: Vec<f64> = arm.iter().map(|r| r.summary.last_dice).collect();
        let loss: Vec<f64> = arm.iter().map(|r| r.summary.last_loss).collect();
        let (bm, bs) = mean_sd(&best);
        let (lm, ls) = mean_sd(&last);
        let (om, os) = mean_sd(&loss);
        let _ = writeln!(
            s,
            "| {init} | {} | {bm:.4} ± {bs:.4} | {lm:.4} ± {ls:.4} | {om:.4} ± {os:.4} |",
            arm.len()
        );
    }
    let t = &config.train;
    let _ = writeln!(
        s,
        "\nSame data split, {} steps, batch {}, lr {}, seeds as listed; Dice on the validation \
         volumes through infl8's own inference, background excluded.\n\nCommand: `{command}`",
        t.steps, t.batch, t.lr
    );
    s
}

/// Validation Dice against step per init, mean over seeds.
pub fn plot(results: &[ArmResult], path: &std::path::Path) -> Result<(), super::plot::PlotError> {
    let mut arms: Vec<super::plot::Series> = Vec::new();
    for r in results {
        let curve = read_curve(&r.summary);
        match arms.iter_mut().find(|a| a.name == r.init) {
            Some(a) => {
                for (p, (_, v)) in a.points.iter_mut().zip(curve) {
                    p.1 += v;
                }
            }
            None => arms.push(super::plot::Series {
                name: r.init.clone(),
                points: curve,
            }),
        }
    }
    for a in &mut arms {
        let n = results.iter().filter(|r| r.init == a.name).count().max(1) as f64;
        for p in &mut a.points {
            p.1 /= n;
        }
    }
    super::plot::plot_arms(path, &arms)
}

/// (step, mean Dice) of a run, from the validation.json it wrote.
fn read_curve(s: &TrainSummary) -> Vec<(f64, f64)> {
    let path = s.best_checkpoint.with_file_name("validation.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Vec::new();
    };
    let Ok((_, vals)) = serde_json::from_str::<(TrainSummary, Vec<super::Validation>)>(&text)
    else {
        return Vec::new();
    };
    vals.iter().map(|v| (v.step as f64, v.mean_dice)).collect()
}

/// Where the report goes by default.
pub fn default_report_path(config: &TrainConfig) -> PathBuf {
    config.train.out.join("ablation.md")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_sd() {
        let (m, s) = mean_sd(&[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12 && (s - 1.0).abs() < 1e-12);
        assert_eq!(mean_sd(&[0.5]), (0.5, 0.0));
    }
}
