//! A tract model that also hands back chosen intermediate tensors, so
//! calibration sees activations exactly as the runtime computes them, on
//! the windows the runtime cuts.
//!
//! It implements [`infl8_backend::Model`], so the segmenter drives it through
//! the model's own preprocessing, windows and batching.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use infl8_backend::batch::{Part, Split};
use infl8_backend::{BackendError, Dim, Model, Tensor, TensorInfo};
use infl8_onnx::proto::ModelProto;
use rayon::prelude::*;
use tract_onnx::prelude::{
    Datum, Framework, InferenceFact, InferenceModelExt, IntoRunnable, IntoTValue,
    TypedRunnableModel, tvec,
};

use crate::calibrate::Histogram;

/// Histograms of the observed tensors, in the order they were asked for.
pub type Stats = Arc<Mutex<Vec<Histogram>>>;

pub struct ObservedModel {
    bytes: Vec<u8>,
    path: PathBuf,
    observed: Vec<String>,
    input: TensorInfo,
    output: TensorInfo,
    /// Plans specialised to one item's shape (batch 1), built on first use.
    plans: Mutex<HashMap<Vec<usize>, Arc<TypedRunnableModel>>>,
    stats: Stats,
}

fn declared(t: &infl8_onnx::DeclaredTensor) -> TensorInfo {
    let shape = match &t.shape {
        Some(dims) => dims
            .iter()
            .enumerate()
            .map(|(i, d)| match d {
                // The batch is whatever the segmenter sends.
                _ if i == 0 => Dim::Symbolic("N".into()),
                infl8_onnx::DeclaredDim::Fixed(n) if *n > 0 => Dim::Fixed(*n as usize),
                infl8_onnx::DeclaredDim::Symbolic(s) => Dim::Symbolic(s.clone()),
                _ => Dim::Symbolic(format!("d{i}")),
            })
            .collect(),
        None => vec![],
    };
    TensorInfo {
        name: t.name.clone(),
        shape,
    }
}

impl ObservedModel {
    /// `model` was read from `path` (named in errors); `observed` are
    /// tensor names of its graph.
    pub fn new(
        path: &Path,
        model: &ModelProto,
        observed: Vec<String>,
    ) -> Result<Self, BackendError> {
        let load_err = |message: String| BackendError::Load {
            path: path.display().to_string(),
            message,
        };
        let inputs = infl8_onnx::inputs(model);
        let outputs = infl8_onnx::outputs(model);
        if inputs.len() != 1 || outputs.len() != 1 {
            return Err(load_err(format!(
                "infl8 needs one input and one output, the model has {} and {}",
                inputs.len(),
                outputs.len()
            )));
        }
        let input = declared(&inputs[0]);
        let output = declared(&outputs[0]);
        if input.shape.is_empty() {
            return Err(load_err(format!(
                "the input {} declares no shape",
                inputs[0].name
            )));
        }
        let stats = Arc::new(Mutex::new(vec![Histogram::new(); observed.len()]));
        Ok(ObservedModel {
            bytes: infl8_onnx::encode(model),
            path: path.to_path_buf(),
            observed,
            input,
            output,
            plans: Mutex::new(HashMap::new()),
            stats,
        })
    }

    pub fn stats(&self) -> Stats {
        self.stats.clone()
    }

    fn plan(&self, item_shape: &[usize]) -> Result<Arc<TypedRunnableModel>, BackendError> {
        let mut plans = self
            .plans
            .lock()
            .map_err(|_| BackendError::Run("a calibration worker panicked".into()))?;
        if let Some(p) = plans.get(item_shape) {
            return Ok(p.clone());
        }
        let err = |e: tract_onnx::prelude::TractError| BackendError::Load {
            path: self.path.display().to_string(),
            message: format!("{e:#}"),
        };
        let mut outputs = vec![self.output.name.clone()];
        outputs.extend(self.observed.iter().cloned());
        let plan = tract_onnx::onnx()
            .model_for_read(&mut self.bytes.as_slice())
            .and_then(|m| {
                m.with_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), item_shape))
            })
            .and_then(|m| m.with_outputs_by_name(&outputs))
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(err)?;
        plans.insert(item_shape.to_vec(), plan.clone());
        Ok(plan)
    }

    fn run_item(
        &self,
        plan: &Arc<TypedRunnableModel>,
        data: &[f32],
        shape: &[usize],
    ) -> Result<(Vec<usize>, Vec<f32>), BackendError> {
        let run_err = |e: tract_onnx::prelude::TractError| BackendError::Run(format!("{e:#}"));
        let x = tract_onnx::prelude::Tensor::from_shape(shape, data).map_err(run_err)?;
        let outs = plan.run(tvec![x.into_tvalue()]).map_err(run_err)?;
        let mut local: Vec<Vec<f32>> = Vec::with_capacity(self.observed.len());
        for o in outs.iter().skip(1) {
            let o = o.cast_to::<f32>().map_err(run_err)?;
            let view = o.try_as_plain_ram().map_err(run_err)?;
            local.push(view.as_slice::<f32>().map_err(run_err)?.to_vec());
        }
        {
            let mut stats = self
                .stats
                .lock()
                .map_err(|_| BackendError::Run("a calibration worker panicked".into()))?;
            for (h, v) in stats.iter_mut().zip(&local) {
                h.add(v);
            }
        }
        let out = outs
            .first()
            .ok_or_else(|| BackendError::Run("the model produced no output".into()))?;
        let out = out.cast_to::<f32>().map_err(run_err)?;
        let view = out.try_as_plain_ram().map_err(run_err)?;
        Ok((
            out.shape().to_vec(),
            view.as_slice::<f32>().map_err(run_err)?.to_vec(),
        ))
    }
}

impl Model for ObservedModel {
    fn input(&self) -> &TensorInfo {
        &self.input
    }

    fn output(&self) -> &TensorInfo {
        &self.output
    }

    fn run(&self, data: &[f32], shape: &[usize]) -> Result<Tensor, BackendError> {
        self.input.check_run_input(data.len(), shape)?;
        let split = Split::new(data, shape, 1)?;
        let parts: Vec<Part<'_>> = split.parts().collect();
        let Some(first) = parts.first() else {
            return split.concat([], &self.output);
        };
        let plan = self.plan(&first.shape)?;
        let outputs: Vec<Tensor> = parts
            .par_iter()
            .map(|part| {
                let (shape, values) = self.run_item(&plan, part.data, &part.shape)?;
                Tensor::from_vec(shape, values)
            })
            .collect::<Result<_, _>>()?;
        split.concat(outputs, &self.output)
    }
}
