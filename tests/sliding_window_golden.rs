//! infl8's sliding window against MONAI's own numbers.
//!
//! The fixtures in `tests/fixtures/sliding_window` were computed by MONAI
//! 1.6.1 `sliding_window_inference` with a predictor that is not
//! translation-equivariant (see the README there), so a window placed one
//! voxel off, a wrong weight or a wrong crop changes the output. Every case
//! is run with several batch sizes (MONAI's own 3, 1, 7, and a model with a
//! fixed batch dimension) and must match to 1e-5, as must the importance map.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use infl8_core::backend::{BackendError, Dim, Model, Tensor, TensorInfo};
use infl8_core::inference::{BlendMode, SlidingWindow, importance_map};
use infl8_suite::npy;
use ndarray::{Array3, Array4, ArrayD, Ix3, Ix4};
use serde_json::Value;

const TOLERANCE: f32 = 1e-5;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sliding_window")
}

/// The fixture predictor: for a window batch `[B, 1, d, h, w]`, output
/// channel c (of 2) at local voxel (i, j, k) is
/// `x[i, j, k] * (1 + c + i/d + 2j/h + 3k/w)`.
struct FixturePredictor {
    input: TensorInfo,
    output: TensorInfo,
}

impl FixturePredictor {
    /// `batch`: a fixed batch dimension, or `None` for a symbolic one.
    fn new(batch: Option<usize>) -> Self {
        let b = batch.map_or(Dim::Symbolic("N".into()), Dim::Fixed);
        let sym = |s: &str| Dim::Symbolic(s.into());
        FixturePredictor {
            input: TensorInfo {
                name: "image".into(),
                shape: vec![b.clone(), Dim::Fixed(1), sym("D"), sym("H"), sym("W")],
            },
            output: TensorInfo {
                name: "scores".into(),
                shape: vec![b, Dim::Fixed(2), sym("D"), sym("H"), sym("W")],
            },
        }
    }
}

impl Model for FixturePredictor {
    fn input(&self) -> &TensorInfo {
        &self.input
    }

    fn output(&self) -> &TensorInfo {
        &self.output
    }

    fn run(&self, data: &[f32], shape: &[usize]) -> Result<Tensor, BackendError> {
        let &[b, 1, d, h, w] = shape else {
            return Err(BackendError::Shape {
                got: shape.to_vec(),
                expected: self.input.to_string(),
            });
        };
        let n = d * h * w;
        let mut out = Vec::with_capacity(b * 2 * n);
        for x in data.chunks_exact(n) {
            for c in 0..2 {
                for i in 0..d {
                    for j in 0..h {
                        for k in 0..w {
                            let f = 1.0
                                + c as f32
                                + i as f32 / d as f32
                                + 2.0 * j as f32 / h as f32
                                + 3.0 * k as f32 / w as f32;
                            out.push(x[(i * h + j) * w + k] * f);
                        }
                    }
                }
            }
        }
        Tensor::from_vec(vec![b, 2, d, h, w], out)
    }
}

struct Case {
    name: String,
    roi: [usize; 3],
    overlap: f64,
    mode: BlendMode,
    sigma_scale: f64,
    input: Array3<f32>,
    output: Array4<f32>,
    importance: Array3<f32>,
}

fn usize3(v: &Value, what: &str) -> Result<[usize; 3]> {
    let a = v
        .as_array()
        .with_context(|| format!("{what} is not a list"))?;
    let n: Vec<usize> = a
        .iter()
        .map(|x| x.as_u64().map(|x| x as usize))
        .collect::<Option<_>>()
        .with_context(|| format!("{what} holds a non-integer"))?;
    n.try_into()
        .map_err(|n| anyhow::anyhow!("{what} {n:?} does not have 3 entries"))
}

fn load_cases() -> Result<Vec<Case>> {
    let text = std::fs::read_to_string(fixtures().join("cases.json"))?;
    let cases: Value = serde_json::from_str(&text)?;
    let cases = cases.as_object().context("cases.json is not an object")?;
    let mut out = Vec::new();
    for (name, c) in cases {
        let mode = match c["mode"].as_str() {
            Some("gaussian") => BlendMode::Gaussian,
            Some("constant") => BlendMode::Constant,
            m => bail!("{name}: unknown mode {m:?}"),
        };
        let read = |what: &str| -> Result<ArrayD<f32>> {
            npy::read_f32(fixtures().join(format!("{name}_{what}.npy")))
        };
        let case = Case {
            name: name.clone(),
            roi: usize3(&c["roi"], "roi")?,
            overlap: c["overlap"].as_f64().context("overlap")?,
            mode,
            sigma_scale: c["sigma_scale"].as_f64().context("sigma_scale")?,
            input: read("input")?.into_dimensionality::<Ix3>()?,
            output: read("output")?.into_dimensionality::<Ix4>()?,
            importance: read("importance")?.into_dimensionality::<Ix3>()?,
        };
        let shape = usize3(&c["shape"], "shape")?;
        assert_eq!(case.input.shape(), &shape, "{name}: input shape");
        out.push(case);
    }
    assert_eq!(out.len(), 4, "cases.json should list c1..c4");
    Ok(out)
}

/// Largest |a - b| (NaN counting as infinite), and where.
fn max_error<D: ndarray::Dimension>(
    a: &ndarray::Array<f32, D>,
    b: &ndarray::Array<f32, D>,
) -> (f32, D::Pattern) {
    assert_eq!(a.shape(), b.shape());
    a.indexed_iter()
        .zip(b.iter())
        .map(|((idx, &x), &y)| {
            let e = (x - y).abs();
            (if e.is_nan() { f32::INFINITY } else { e }, idx)
        })
        .max_by(|p, q| p.0.total_cmp(&q.0))
        .expect("fixtures are not empty")
}

fn check_outputs(batch_size: usize, fixed_batch: Option<usize>) -> Result<()> {
    let model = FixturePredictor::new(fixed_batch);
    for case in load_cases()? {
        let sw = SlidingWindow {
            roi: case.roi,
            overlap: case.overlap,
            mode: case.mode,
            sigma_scale: case.sigma_scale,
            batch_size,
            pad_value: 0.0,
        };
        let image = case.input.clone().insert_axis(ndarray::Axis(0));
        let out = sw.run(image.view(), &model, &|_, _| {})?;
        let (err, at) = max_error(&out, &case.output);
        eprintln!(
            "{} batch {batch_size} fixed {fixed_batch:?}: max error {err:e}",
            case.name
        );
        assert!(
            err <= TOLERANCE,
            "{} (batch {batch_size}, fixed {fixed_batch:?}): max error {err:e} at {at:?}: \
             got {}, MONAI {}",
            case.name,
            out[at],
            case.output[at]
        );
    }
    Ok(())
}

#[test]
fn importance_maps_match_monai() -> Result<()> {
    for case in load_cases()? {
        let map = importance_map(case.roi, case.mode, case.sigma_scale);
        let (err, at) = max_error(&map, &case.importance);
        eprintln!("{}: importance max error {err:e}", case.name);
        assert!(
            err <= TOLERANCE,
            "{}: importance map off by {err:e} at {at:?}",
            case.name
        );
    }
    Ok(())
}

#[test]
fn outputs_match_monai_batch_3() -> Result<()> {
    check_outputs(3, None)
}

#[test]
fn outputs_match_monai_batch_1() -> Result<()> {
    check_outputs(1, None)
}

#[test]
fn outputs_match_monai_batch_7() -> Result<()> {
    check_outputs(7, None)
}

#[test]
fn outputs_match_monai_with_a_fixed_batch_model() -> Result<()> {
    // batch_size is ignored for a fixed-batch model: every call carries 4
    // windows, the last padded with zero windows.
    check_outputs(3, Some(4))
}
