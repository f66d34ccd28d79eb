//! Command-line flags that describe how to run a model (window, intensity,
//! spacing), shared by every binary that runs one: `infl8 segment` and
//! `infl8-train quantize` must read a model without a manifest the same way.

use clap::{Args, ValueEnum};
use serde_json::{Map, Value, json};

use crate::config::ModelOverrides;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Blend {
    Gaussian,
    Constant,
}

/// The manifest fields a user may give or override on the command line.
#[derive(Args, Clone, Debug, Default)]
pub struct ModelArgs {
    /// Window size (voxels) for sliding-window inference.
    #[arg(long, num_args = 3, value_names = ["X", "Y", "Z"])]
    pub roi: Option<Vec<usize>>,
    /// Fraction by which neighbouring windows overlap, in [0, 1).
    #[arg(long, value_parser = finite)]
    pub overlap: Option<f64>,
    /// How overlapping windows are blended.
    #[arg(long, value_enum)]
    pub mode: Option<Blend>,
    /// Gaussian sigma as a fraction of the window size.
    #[arg(long, value_parser = finite)]
    pub sigma_scale: Option<f64>,
    /// 2.5D slab inference with this many neighbouring slices.
    #[arg(long, value_name = "D")]
    pub slab_depth: Option<usize>,
    /// Intensity window: clip to [LO, HI], scale to [0, 1].
    #[arg(long, num_args = 2, value_names = ["LO", "HI"], allow_negative_numbers = true, value_parser = finite)]
    pub window: Option<Vec<f64>>,
    /// z-score intensities instead of a window.
    #[arg(long)]
    pub zscore: bool,
    /// Resample to this voxel spacing (mm) before inference.
    #[arg(long, num_args = 3, value_names = ["X", "Y", "Z"], value_parser = finite)]
    pub spacing: Option<Vec<f64>>,
    /// Input channels of a model without a manifest.
    #[arg(long)]
    pub channels: Option<usize>,
}

/// A number flag: NaN and infinities are refused here, because the layer
/// they go into is JSON, which has no such numbers (they would turn into
/// "not given" and be ignored).
fn finite(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("`{s}`: {e}"))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("`{s}` is not a finite number"))
    }
}

impl ModelArgs {
    /// The flags the user gave, as the `model` table of a config layer
    /// (only what was passed, so unset flags never mask a config file).
    pub fn layer(&self) -> Map<String, Value> {
        let mut model = Map::new();
        let mut put = |k: &str, v: Value| {
            model.insert(k.into(), v);
        };
        if let Some(r) = &self.roi {
            put("roi", json!(r));
        }
        if let Some(o) = self.overlap {
            put("overlap", json!(o));
        }
        if let Some(b) = self.mode {
            let s = match b {
                Blend::Gaussian => "gaussian",
                Blend::Constant => "constant",
            };
            put("blend", json!(s));
        }
        if let Some(s) = self.sigma_scale {
            put("sigma_scale", json!(s));
        }
        if let Some(d) = self.slab_depth {
            put("slab_depth", json!(d));
        }
        if let Some(w) = &self.window {
            put("window", json!(w));
        }
        if self.zscore {
            put("zscore", json!(true));
        }
        if let Some(s) = &self.spacing {
            put("spacing", json!(s));
        }
        if let Some(c) = self.channels {
            put("input_channels", json!(c));
        }
        model
    }

    /// The same flags as overrides, for tools that take no config file.
    pub fn overrides(&self) -> Result<ModelOverrides, serde_json::Error> {
        serde_json::from_value(Value::Object(self.layer()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        model: ModelArgs,
    }

    #[test]
    fn flags_become_overrides() {
        let cli = Cli::parse_from([
            "x",
            "--roi",
            "8",
            "16",
            "32",
            "--window",
            "-100",
            "300",
            "--spacing",
            "2",
            "2",
            "2",
            "--mode",
            "constant",
        ]);
        let o = cli.model.overrides().unwrap();
        assert_eq!(o.roi, Some([8, 16, 32]));
        assert_eq!(o.window, Some([-100.0, 300.0]));
        assert_eq!(o.spacing, Some([2.0, 2.0, 2.0]));
        assert_eq!(o.blend, Some(crate::inference::BlendMode::Constant));
        assert_eq!(o.zscore, None);
    }

    #[test]
    fn non_finite_numbers_are_refused_not_dropped() {
        for args in [
            &["x", "--overlap", "NaN"][..],
            &["x", "--overlap", "inf"],
            &["x", "--sigma-scale", "nan"],
            &["x", "--window", "0", "NaN"],
            &["x", "--spacing", "1", "inf", "1"],
        ] {
            let e = Cli::try_parse_from(args).err().map(|e| e.to_string());
            let e = e.unwrap_or_else(|| panic!("{args:?} was accepted"));
            assert!(e.contains("not a finite number"), "{args:?}: {e}");
        }
        let cli = Cli::parse_from(["x", "--overlap", "0.5"]);
        assert_eq!(cli.model.overrides().unwrap().overlap, Some(0.5));
    }

    #[test]
    fn no_flags_no_overrides() {
        let cli = Cli::parse_from(["x"]);
        assert!(cli.model.layer().is_empty());
        assert_eq!(cli.model.overrides().unwrap(), ModelOverrides::default());
    }
}
