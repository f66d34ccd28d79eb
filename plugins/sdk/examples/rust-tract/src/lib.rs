//! A complete infl8 backend plugin in Rust: ONNX models on tract-onnx, one
//! batch item at a time. Copy this crate to start a plugin; `plugins/tract`
//! is the production version of the same idea (parallel batch items,
//! precision options, tract's logs bridged to the host).
//!
//! `export_plugin!` writes the C ABI side: the entry symbol, the function
//! table, argument checks, error buffers and `catch_unwind` around every
//! call, so a panic in here reaches the host as an error, never a crash.

use std::path::Path;
use std::sync::Arc;

use infl8_backend::batch::Split;
use infl8_backend::{
    Backend, BackendError, Dim, LoadOptions, Model, PRECISION_KEY, Precision, Tensor, TensorInfo,
};
use tract_onnx::prelude::{
    Datum, Framework, InferenceFact, InferenceModelExt, IntoRunnable, IntoTValue, TractError,
    TypedRunnableModel, tvec,
};
use tract_onnx::tract_hir::infer::GenericFactoid;

infl8_backend::export_plugin! {
    name: "example-rust",
    version: env!("CARGO_PKG_VERSION"),
    backends: [Box::new(ExampleBackend)],
}

/// The example's one backend (public for its tests, which run the backend
/// suite on it in process).
pub struct ExampleBackend;

impl Backend for ExampleBackend {
    fn name(&self) -> &str {
        "example-rust"
    }

    fn description(&self) -> &str {
        "SDK example: tract-onnx, one batch item at a time"
    }

    fn load(&self, model: &Path, _opts: &LoadOptions) -> Result<Box<dyn Model>, BackendError> {
        Ok(Box::new(ExampleModel::load(model)?))
    }

    /// `infl8 config check` asks this (plugin ABI 1.2) for a profile's
    /// `backend_options.example-rust`: the example reads no option, so any
    /// key but the precision every backend of a chain receives is an error,
    /// named as `key: problem`.
    fn check_options(&self, opts: &LoadOptions) -> Result<Vec<String>, BackendError> {
        if let Some(key) = opts.extra.keys().find(|k| k.as_str() != PRECISION_KEY) {
            return Err(BackendError::InvalidArgument(format!(
                "{key}: the example plugin reads no options"
            )));
        }
        Ok(match opts.requested_precision()? {
            Precision::Fp32 => vec![],
            p => vec![format!(
                "{PRECISION_KEY}: {} is not honoured; the example runs fp32",
                p.as_str()
            )],
        })
    }
}

struct ExampleModel {
    /// Specialised to the model's fixed batch, else to batch 1 (each item
    /// of a batch then runs on its own).
    plan: Arc<TypedRunnableModel>,
    /// Items per plan run.
    batch: usize,
    input: TensorInfo,
    output: TensorInfo,
}

impl ExampleModel {
    fn load(path: &Path) -> Result<Self, BackendError> {
        let fail = |message: String| BackendError::Load {
            path: path.display().to_string(),
            message,
        };
        let tract = |e: TractError| fail(format!("{e:#}"));
        let mut model = tract_onnx::onnx().model_for_path(path).map_err(tract)?;
        // infl8 runs batches of fixed-size windows: every input dimension
        // but the first (the batch) must be known.
        let fact = model.input_fact(0).map_err(tract)?.clone();
        let item: Option<Vec<usize>> = fact
            .shape
            .dims()
            .skip(1)
            .map(|d| match d {
                GenericFactoid::Only(d) => d.as_i64().and_then(|d| usize::try_from(d).ok()),
                GenericFactoid::Any => None,
            })
            .collect();
        let item = item
            .filter(|_| !fact.shape.is_open())
            .ok_or_else(|| fail(format!("input {fact:?}: its non-batch dims must be fixed")))?;
        let input_name = model
            .node(model.input_outlets().map_err(tract)?[0].node)
            .name
            .clone();
        // A batch fixed above one runs whole; any other runs item by item.
        let fixed_batch = match fact.shape.dims().next() {
            Some(GenericFactoid::Only(d)) => d.as_i64().and_then(|d| usize::try_from(d).ok()),
            _ => None,
        }
        .filter(|&b| b > 1);
        let batch = fixed_batch.unwrap_or(1);
        let in_shape: Vec<usize> = std::iter::once(batch).chain(item.iter().copied()).collect();
        model
            .set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), in_shape))
            .map_err(tract)?;
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(tract)?;
        let out_fact = plan.model().output_fact(0).map_err(tract)?;
        let out_shape = out_fact
            .shape
            .as_concrete()
            .filter(|s| s.first() == Some(&batch))
            .ok_or_else(|| fail("the output must be batch-first with a known shape".into()))?;
        let first = match fixed_batch {
            Some(b) => Dim::Fixed(b),
            None => Dim::Symbolic("N".into()),
        };
        let info = |name: String, rest: &[usize]| TensorInfo {
            name,
            shape: std::iter::once(first.clone())
                .chain(rest.iter().map(|&d| Dim::Fixed(d)))
                .collect(),
        };
        // The ONNX output's own name (the outlet's label), not the name of
        // whatever node the optimiser left producing it.
        let typed = plan.model();
        let outlet = typed.output_outlets().map_err(tract)?[0];
        let output_name = typed
            .outlet_label(outlet)
            .unwrap_or(&typed.node(outlet.node).name)
            .to_owned();
        Ok(ExampleModel {
            input: info(input_name, &item),
            output: info(output_name, &out_shape[1..]),
            batch,
            plan,
        })
    }
}

impl Model for ExampleModel {
    fn input(&self) -> &TensorInfo {
        &self.input
    }

    fn output(&self) -> &TensorInfo {
        &self.output
    }

    fn run(&self, data: &[f32], shape: &[usize]) -> Result<Tensor, BackendError> {
        // The shape check is the backend's job: the glue turns this error
        // into INFL8_SHAPE_MISMATCH with the message.
        self.input.check_run_input(data.len(), shape)?;
        let run_error = |e: TractError| BackendError::Run(format!("{e:#}"));
        // The plan runs `batch` items: the helper feeds it that many at a
        // time and joins the outputs, checking that each comes back
        // batch-first.
        Split::new(data, shape, self.batch)?.run_in_order(&self.output, |item, item_shape| {
            let x = tract_onnx::prelude::Tensor::from_shape(item_shape, item).map_err(run_error)?;
            let y = self.plan.run(tvec![x.into_tvalue()]).map_err(run_error)?;
            let y = y[0].cast_to::<f32>().map_err(run_error)?;
            let values = y.try_as_plain_ram().map_err(run_error)?;
            let values = values.as_slice::<f32>().map_err(run_error)?;
            Tensor::from_vec(y.shape().to_vec(), values.to_vec())
        })
    }
}
