//! What a model needs to be run: input channels, inference mode, spacing,
//! normalisation, labels.
//!
//! Sources, first found wins: the ONNX `metadata_props` entry
//! `infl8.manifest` (JSON), a sidecar `MODEL.onnx.json`, or — for a model
//! exported by another tool — settings given as flags or in the config.
//! Flags and config then override individual fields in every case.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::TensorInfo;
use crate::inference::{BlendMode, Slab, SlidingWindow};
use crate::preprocess::{Normalization, PreprocessSpec};

pub const MANIFEST_FORMAT: u32 = 1;

/// Manifest fields a user can give or override, as flags or in the
/// settings' `model` section ([`crate::config::Settings::model`]).
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

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: invalid infl8 manifest ({origin}): {message}")]
    Invalid {
        path: PathBuf,
        origin: &'static str,
        message: String,
    },
    #[error("{path}: {source}")]
    Onnx {
        path: PathBuf,
        #[source]
        source: infl8_onnx::OnnxError,
    },
    #[error(
        "{path} has no infl8 manifest (no `infl8.manifest` metadata, no {sidecar}) and {missing}; \
         give the settings as flags (e.g. --roi X Y Z, --window LO HI) or in the config"
    )]
    Incomplete {
        path: PathBuf,
        sidecar: String,
        missing: String,
    },
    #[error("{path}: the model does not fit its manifest: {message}")]
    Mismatch { path: PathBuf, message: String },
}

/// How windows are cut from the volume.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InferenceMode {
    /// 3D tiles, MONAI-equivalent blending.
    SlidingWindow(SlidingWindow),
    /// 2.5D: D neighbouring slices in, the middle slice out.
    Slab(Slab),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
// A misspelt key (`"overlapp"`) would otherwise be dropped and the model run
// with the default it meant to change, as settings files refuse them too.
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(default = "format_v1")]
    pub format: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub input_channels: usize,
    /// Class names by label value; index 0 is the background.
    pub labels: Vec<String>,
    pub inference: InferenceMode,
    #[serde(default)]
    pub preprocess: PreprocessSpec,
    /// Clean-up the model was validated with; the runtime applies it unless
    /// told otherwise (`--no-postprocess`). Absent means none.
    #[serde(default, skip_serializing_if = "Postprocessing::is_none")]
    pub postprocess: Postprocessing,
}

/// Label-map clean-up after the argmax, on the input's grid.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Postprocessing {
    /// Keep each label's largest 26-connected component.
    pub largest_component: bool,
    /// Fill background enclosed by one label (ventricles in a brain mask).
    pub fill_holes: bool,
}

impl Postprocessing {
    pub fn is_none(&self) -> bool {
        *self == Postprocessing::default()
    }

    /// Both steps wanted by either side.
    pub fn union(self, other: Postprocessing) -> Postprocessing {
        Postprocessing {
            largest_component: self.largest_component || other.largest_component,
            fill_holes: self.fill_holes || other.fill_holes,
        }
    }
}

fn format_v1() -> u32 {
    MANIFEST_FORMAT
}

/// Where the manifest came from (reported by `infl8 info` and in logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestOrigin {
    Metadata,
    Sidecar,
    Settings,
}

impl std::fmt::Display for ManifestOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ManifestOrigin::Metadata => "ONNX metadata",
            ManifestOrigin::Sidecar => "sidecar JSON",
            ManifestOrigin::Settings => "flags/config",
        })
    }
}

impl Manifest {
    pub fn to_json(&self) -> String {
        // A manifest is plain data; serialising it cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(
        json: &str,
        path: &Path,
        origin: &'static str,
    ) -> Result<Manifest, ManifestError> {
        let m: Manifest = serde_json::from_str(json).map_err(|e| ManifestError::Invalid {
            path: path.to_path_buf(),
            origin,
            message: e.to_string(),
        })?;
        m.validate().map_err(|message| ManifestError::Invalid {
            path: path.to_path_buf(),
            origin,
            message,
        })?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), String> {
        if self.format != MANIFEST_FORMAT {
            return Err(format!(
                "format {} is not supported (this infl8 reads format {MANIFEST_FORMAT})",
                self.format
            ));
        }
        if self.input_channels == 0 {
            return Err("input_channels must be at least 1".into());
        }
        if self.labels.len() < 2 || self.labels.len() > 256 {
            return Err(format!(
                "labels must name 2 to 256 classes (background first), got {}",
                self.labels.len()
            ));
        }
        match &self.inference {
            InferenceMode::SlidingWindow(sw) => {
                if sw.roi.contains(&0) {
                    return Err(format!("roi {:?} has a zero size", sw.roi));
                }
                if !(0.0..1.0).contains(&sw.overlap) {
                    return Err(format!("overlap {} is not in [0, 1)", sw.overlap));
                }
            }
            InferenceMode::Slab(s) => {
                if s.depth == 0 {
                    return Err("slab depth must be at least 1".into());
                }
                if !(0.0..1.0).contains(&s.overlap) {
                    return Err(format!("overlap {} is not in [0, 1)", s.overlap));
                }
            }
        }
        if let Some(sp) = self.preprocess.target_spacing
            && sp.iter().any(|v| !(v.is_finite() && *v > 0.0))
        {
            return Err(format!("target_spacing {sp:?} must be finite and > 0"));
        }
        Ok(())
    }

    /// Applies user overrides field by field.
    pub fn apply(&mut self, o: &ModelOverrides) {
        if let Some(c) = o.input_channels {
            self.input_channels = c;
        }
        if let Some(l) = &o.labels {
            self.labels = l.clone();
        }
        if let Some(depth) = o.slab_depth {
            if let InferenceMode::Slab(s) = &mut self.inference {
                s.depth = depth;
            } else {
                self.inference = InferenceMode::Slab(Slab {
                    depth,
                    ..Slab::default()
                });
            }
        }
        match &mut self.inference {
            InferenceMode::SlidingWindow(sw) => {
                if let Some(r) = o.roi {
                    sw.roi = r;
                }
                if let Some(v) = o.overlap {
                    sw.overlap = v;
                }
                if let Some(b) = o.blend {
                    sw.mode = b;
                }
                if let Some(s) = o.sigma_scale {
                    sw.sigma_scale = s;
                }
            }
            InferenceMode::Slab(s) => {
                if let Some(r) = o.roi {
                    s.roi_xy = Some([r[0], r[1]]);
                }
                if let Some(v) = o.overlap {
                    s.overlap = v;
                }
                if let Some(b) = o.blend {
                    s.mode = b;
                }
                if let Some(v) = o.sigma_scale {
                    s.sigma_scale = v;
                }
            }
        }
        if let Some(sp) = o.spacing {
            self.preprocess.target_spacing = Some(sp);
        }
        if let Some([lo, hi]) = o.window {
            self.preprocess.normalization = Normalization::IntensityWindow { lo, hi };
        }
        if o.zscore == Some(true) {
            self.preprocess.normalization = Normalization::Zscore { nonzero: false };
        }
    }
}

/// Path of the sidecar manifest: `MODEL.onnx.json`.
pub fn sidecar_path(model: &Path) -> PathBuf {
    let mut s = model.as_os_str().to_owned();
    s.push(".json");
    PathBuf::from(s)
}

/// The manifest in a decoded model's `infl8.manifest` metadata entry, if it
/// has one; `model_path` names the model in errors.
pub fn from_metadata(
    model: &infl8_onnx::ModelProto,
    model_path: &Path,
) -> Result<Option<Manifest>, ManifestError> {
    infl8_onnx::metadata(model, infl8_onnx::MANIFEST_KEY)
        .map(|json| Manifest::from_json(json, model_path, "ONNX metadata infl8.manifest"))
        .transpose()
}

/// Finds the manifest of a model file (metadata, then sidecar), without
/// overrides. `Ok(None)` when the model carries none.
pub fn find(model_path: &Path) -> Result<Option<(Manifest, ManifestOrigin)>, ManifestError> {
    let model = infl8_onnx::read_model(model_path).map_err(|source| ManifestError::Onnx {
        path: model_path.to_path_buf(),
        source,
    })?;
    if let Some(m) = from_metadata(&model, model_path)? {
        return Ok(Some((m, ManifestOrigin::Metadata)));
    }
    let sidecar = sidecar_path(model_path);
    if sidecar.is_file() {
        let json = std::fs::read_to_string(&sidecar).map_err(|e| ManifestError::Invalid {
            path: sidecar.clone(),
            origin: "sidecar",
            message: e.to_string(),
        })?;
        let m = Manifest::from_json(&json, &sidecar, "sidecar")?;
        return Ok(Some((m, ManifestOrigin::Sidecar)));
    }
    Ok(None)
}

/// The manifest to run `model_path` with: its own (metadata or sidecar)
/// with the overrides applied, or one built from the overrides and the
/// model's declared I/O when the model has none.
pub fn resolve(
    model_path: &Path,
    input: &TensorInfo,
    output: &TensorInfo,
    overrides: &ModelOverrides,
) -> Result<(Manifest, ManifestOrigin), ManifestError> {
    let (mut m, origin) = match find(model_path)? {
        Some(found) => found,
        None => (
            from_settings(model_path, input, output, overrides)?,
            ManifestOrigin::Settings,
        ),
    };
    m.apply(overrides);
    m.validate().map_err(|message| ManifestError::Invalid {
        path: model_path.to_path_buf(),
        origin: "after applying flags/config",
        message,
    })?;
    check_model_fits(&m, model_path, input, output)?;
    Ok((m, origin))
}

fn from_settings(
    model_path: &Path,
    input: &TensorInfo,
    output: &TensorInfo,
    o: &ModelOverrides,
) -> Result<Manifest, ManifestError> {
    let incomplete = |missing: String| ManifestError::Incomplete {
        path: model_path.to_path_buf(),
        sidecar: sidecar_path(model_path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        missing,
    };
    let fixed = |i: usize| input.shape.get(i).and_then(|d| d.fixed());
    let input_channels = match (o.input_channels, o.slab_depth) {
        (Some(c), _) => c,
        (None, Some(d)) if input.rank() == 4 => fixed(1).map(|c| (c / d).max(1)).unwrap_or(1),
        _ => fixed(1).unwrap_or(1),
    };
    let inference = match o.slab_depth {
        Some(depth) => InferenceMode::Slab(Slab {
            depth,
            ..Slab::default()
        }),
        None => {
            let roi = match (o.roi, input.rank()) {
                (Some(r), _) => r,
                (None, 5) => match (fixed(2), fixed(3), fixed(4)) {
                    (Some(a), Some(b), Some(c)) => [a, b, c],
                    _ => {
                        return Err(incomplete(format!(
                            "its input {input} has no fixed spatial size, so the window size is unknown (--roi)"
                        )));
                    }
                },
                (None, r) => {
                    return Err(incomplete(format!(
                        "its input {input} has rank {r}: a 3D window model needs rank 5 [N, C, X, Y, Z], \
                         a 2.5D model needs --slab-depth"
                    )));
                }
            };
            InferenceMode::SlidingWindow(SlidingWindow {
                roi,
                ..SlidingWindow::default()
            })
        }
    };
    let classes = output.shape.get(1).and_then(|d| d.fixed()).unwrap_or(2);
    let labels = (0..classes)
        .map(|i| {
            if i == 0 {
                "background".to_string()
            } else {
                format!("label{i}")
            }
        })
        .collect();
    if o.window.is_none() && o.zscore.is_none() {
        tracing::warn!(
            model = %model_path.display(),
            "no intensity normalisation given (--window LO HI or --zscore): feeding raw intensities"
        );
    }
    Ok(Manifest {
        format: MANIFEST_FORMAT,
        name: None,
        input_channels,
        labels,
        inference,
        preprocess: PreprocessSpec::default(),
        postprocess: Postprocessing::default(),
    })
}

/// Checks the model's declared I/O against the manifest, so a misfit is
/// reported before any voxel is processed.
pub fn check_model_fits(
    m: &Manifest,
    model_path: &Path,
    input: &TensorInfo,
    output: &TensorInfo,
) -> Result<(), ManifestError> {
    let mismatch = |message: String| ManifestError::Mismatch {
        path: model_path.to_path_buf(),
        message,
    };
    let fixed = |t: &TensorInfo, i: usize| t.shape.get(i).and_then(|d| d.fixed());
    let c = m.input_channels;
    match &m.inference {
        InferenceMode::SlidingWindow(sw) => {
            if input.rank() != 5 {
                return Err(mismatch(format!(
                    "sliding-window inference needs a rank-5 input [N, C, X, Y, Z], the model's is {input}"
                )));
            }
            if let Some(mc) = fixed(input, 1)
                && mc != c
            {
                return Err(mismatch(format!(
                    "the manifest says {c} input channel(s), the model's input {input} takes {mc}"
                )));
            }
            for (axis, &r) in sw.roi.iter().enumerate() {
                if let Some(d) = fixed(input, 2 + axis)
                    && d != r
                {
                    return Err(mismatch(format!(
                        "window size {:?} does not fit the model's input {input}",
                        sw.roi
                    )));
                }
            }
        }
        InferenceMode::Slab(s) => match input.rank() {
            5 => {
                if let Some(d) = fixed(input, 2)
                    && d != s.depth
                {
                    return Err(mismatch(format!(
                        "slab depth {} does not fit the model's input {input} (depth on axis 2)",
                        s.depth
                    )));
                }
                if let Some(mc) = fixed(input, 1)
                    && mc != c
                {
                    return Err(mismatch(format!(
                        "the manifest says {c} input channel(s), the model's input {input} takes {mc}"
                    )));
                }
            }
            4 => {
                if let Some(mc) = fixed(input, 1)
                    && mc != c * s.depth
                {
                    return Err(mismatch(format!(
                        "{c} channel(s) x slab depth {} = {} input channels, the model's input {input} takes {mc}",
                        s.depth,
                        c * s.depth
                    )));
                }
            }
            r => {
                return Err(mismatch(format!(
                    "slab inference needs a rank-4 [N, C*D, X, Y] or rank-5 [N, C, D, X, Y] input, the model's {input} has rank {r}"
                )));
            }
        },
    }
    if let Some(k) = fixed(output, 1)
        && k != m.labels.len()
    {
        return Err(mismatch(format!(
            "the manifest names {} labels, the model's output {output} has {k} channels",
            m.labels.len()
        )));
    }
    Ok(())
}

/// Default window blending, re-exported for flag parsing.
pub fn parse_blend(s: &str) -> Option<BlendMode> {
    match s {
        "gaussian" => Some(BlendMode::Gaussian),
        "constant" => Some(BlendMode::Constant),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzzer finding (core/tests/fuzz-regressions/manifest_parse/): this
    /// percentile was read as one f64, written as its shortest form, and
    /// read back as the next f64 up.
    #[test]
    fn floats_read_back_bit_for_bit() {
        let hi = "9".to_string() + &"5".repeat(106) + ".0";
        let json = format!(
            r#"{{"input_channels":1,"labels":["background","head"],
                "inference":{{"kind":"sliding_window","roi":[64,64,64],"sigma_scale":0.126}},
                "preprocess":{{"normalization":{{"kind":"percentile","lo":1.0,"hi":{hi}}}}}}}"#
        );
        let p = Path::new("m.json");
        let m = Manifest::from_json(&json, p, "sidecar").unwrap();
        let again = Manifest::from_json(&m.to_json(), p, "sidecar").unwrap();
        assert_eq!(again, m, "{}", m.to_json());
    }

    #[test]
    fn unknown_keys_are_refused_at_every_level() {
        let good = r#"{"input_channels":1,"labels":["background","head"],
            "inference":{"kind":"sliding_window","roi":[64,64,64]}}"#;
        let p = Path::new("m.onnx.json");
        Manifest::from_json(good, p, "sidecar").unwrap();
        for (bad, key) in [
            (
                good.replacen("\"labels\"", "\"lables\":[],\"labels\"", 1),
                "lables",
            ),
            (
                good.replacen("\"roi\"", "\"overlapp\":0.9,\"roi\"", 1),
                "overlapp",
            ),
            (
                r#"{"input_channels":1,"labels":["b","h"],
                   "inference":{"kind":"slab","depth":3,"roi":[1,2]}}"#
                    .to_string(),
                "roi",
            ),
            (
                good.replacen("}}", "},\"preprocess\":{\"spacing\":[1,1,1]}}", 1),
                "spacing",
            ),
        ] {
            let e = Manifest::from_json(&bad, p, "sidecar")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("unknown field `{key}`")) && e.contains("m.onnx.json"),
                "{bad}: {e}"
            );
        }
    }
}
