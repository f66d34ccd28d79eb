//! infl8 backend plugin `tract`: inference on tract-onnx, pure Rust. Two
//! backends, one model-loading path: `tract` on the CPU, and (cargo
//! feature `cuda`, on by default; `cuda-12` for JetPack 6) `tract-cuda` on
//! an NVIDIA GPU through tract's CUDA runtime ([`cuda`]), which runs a
//! batch in one invocation and reports itself unavailable on a machine
//! without CUDA, so a chain `tract-cuda,tract` falls back.
//!
//! On the CPU:
//! tract runs one model invocation on one thread, so a batch is split into
//! its items, which run in parallel on a rayon pool sized by
//! [`LoadOptions::threads`]; their outputs are joined by
//! [`infl8_backend::batch`] into one contiguous buffer that goes to the host
//! without a copy.
//!
//! The batch dimension (the input's first) is made symbolic whatever the
//! ONNX file says (symbolic, unknown or 1), so any batch size runs. The plan
//! that actually executes is specialised to batch 1, the size each item
//! runs at, which lets tract optimise with concrete shapes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Once};

use infl8_backend::batch::{Part, Split};
use infl8_backend::{
    Backend, BackendError, Dim, LoadOptions, Model, PRECISION_KEY, Precision, Tensor, TensorInfo,
};
use rayon::prelude::*;
use tract_onnx::prelude::{
    Datum, Framework, InferenceFact, InferenceModel, InferenceModelExt, IntoRunnable, IntoTValue,
    OutletId, Symbol, TDim, TVec, TractResult, TypedFact, TypedModel, TypedRunnableModel, tvec,
};
use tract_onnx::tract_hir::infer::GenericFactoid;

#[cfg(any(feature = "cuda", feature = "cuda-12"))]
pub mod cuda;

#[cfg(any(feature = "cuda", feature = "cuda-12"))]
infl8_backend::export_plugin! {
    name: "tract",
    version: env!("CARGO_PKG_VERSION"),
    backends: [Box::new(TractBackend::new()), Box::new(TractBackend::cuda())],
}

#[cfg(not(any(feature = "cuda", feature = "cuda-12")))]
infl8_backend::export_plugin! {
    name: "tract",
    version: env!("CARGO_PKG_VERSION"),
    backends: [Box::new(TractBackend::new())],
}

/// Where a tract backend runs its models.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Device {
    Cpu,
    #[cfg(any(feature = "cuda", feature = "cuda-12"))]
    Cuda,
}

/// The `tract` backend (and `tract-cuda`, built with a CUDA feature).
pub struct TractBackend {
    device: Device,
}

impl TractBackend {
    /// The CPU backend, `tract`.
    pub fn new() -> Self {
        bridge_log_to_tracing();
        TractBackend {
            device: Device::Cpu,
        }
    }

    /// The GPU backend, `tract-cuda`.
    #[cfg(any(feature = "cuda", feature = "cuda-12"))]
    pub fn cuda() -> Self {
        bridge_log_to_tracing();
        TractBackend {
            device: Device::Cuda,
        }
    }
}

impl Default for TractBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Backend for TractBackend {
    fn name(&self) -> &str {
        match self.device {
            Device::Cpu => "tract",
            #[cfg(any(feature = "cuda", feature = "cuda-12"))]
            Device::Cuda => cuda::BACKEND,
        }
    }

    fn description(&self) -> &str {
        match self.device {
            Device::Cpu => "CPU inference with tract-onnx (pure Rust; batch items run in parallel)",
            #[cfg(any(feature = "cuda", feature = "cuda-12"))]
            Device::Cuda => "NVIDIA GPU inference with tract-cuda (CUDA loaded at run time; GPU 0)",
        }
    }

    fn load(&self, model: &Path, opts: &LoadOptions) -> Result<Box<dyn Model>, BackendError> {
        Ok(Box::new(TractModel::load_on(model, opts, self.device)?))
    }

    fn check_options(&self, opts: &LoadOptions) -> Result<Vec<String>, BackendError> {
        let mut notes = Vec::new();
        for key in opts.extra.keys().filter(|k| k.as_str() != PRECISION_KEY) {
            match self.device {
                #[cfg(any(feature = "cuda", feature = "cuda-12"))]
                Device::Cuda if key == cuda::KEY_DEVICE => {
                    cuda::device(opts)?;
                }
                #[cfg(any(feature = "cuda", feature = "cuda-12"))]
                Device::Cpu if key == cuda::KEY_DEVICE => {
                    notes.push(format!("{key}: tract does not read it (tract-cuda does)"))
                }
                _ => {
                    return Err(BackendError::InvalidArgument(format!(
                        "{key}: not an option of the tract plugin (it reads {})",
                        OPTION_KEYS.join(", ")
                    )));
                }
            }
        }
        notes.extend(precision_note(opts, self.device)?);
        Ok(notes)
    }
}

/// Every key the plugin reads, on one backend or the other.
#[cfg(any(feature = "cuda", feature = "cuda-12"))]
const OPTION_KEYS: &[&str] = &[PRECISION_KEY, cuda::KEY_DEVICE];
#[cfg(not(any(feature = "cuda", feature = "cuda-12")))]
const OPTION_KEYS: &[&str] = &[PRECISION_KEY];

/// What to say about the requested precision: nothing for fp32 (and fp16
/// on the GPU), a note for a precision tract has no switch for (every
/// backend of a chain gets the profile's precision, so that is not an
/// error).
fn precision_note(opts: &LoadOptions, device: Device) -> Result<Option<String>, BackendError> {
    Ok(match (opts.requested_precision()?, device) {
        (Precision::Fp32, _) => None,
        #[cfg(any(feature = "cuda", feature = "cuda-12"))]
        (Precision::Fp16, Device::Cuda) => None,
        (p, _) => Some(format!(
            "{PRECISION_KEY}: {} has no switch in tract; tract runs the model as stored \
             (an INT8 QDQ model file runs as INT8)",
            p.as_str()
        )),
    })
}

/// tract (and its dependencies) log through `log`; send that to `tracing`,
/// which the plugin glue has connected to the host. Once per library: `log`
/// takes one logger per process image.
fn bridge_log_to_tracing() {
    static BRIDGE: Once = Once::new();
    BRIDGE.call_once(|| {
        use tracing::level_filters::LevelFilter;
        use tracing_log::AsLog;
        // tract's debug output narrates every optimiser pass: only a host
        // that records TRACE gets it; otherwise records stop at INFO, so
        // they cost nothing when nobody reads them. `init` fails only if
        // this image already has a logger (the plugin linked into a host
        // that set one), which then receives tract's records itself.
        let max = match LevelFilter::current() {
            LevelFilter::TRACE => LevelFilter::TRACE,
            host => host.min(LevelFilter::INFO),
        };
        let _ = tracing_log::LogTracer::builder()
            .with_max_level(max.as_log())
            .init();
    });
}

/// How a batch maps onto tract invocations.
enum Batching {
    /// The batch is symbolic: one invocation per item (batch 1), the items
    /// in parallel.
    ItemsInParallel,
    /// One invocation for the whole batch: the ONNX file fixes a batch
    /// other than 1, or the GPU, which wants big invocations, runs it.
    WholeBatch,
}

/// The plan that executes: tract's CPU plan, or the GPU's.
enum Plan {
    Cpu(Arc<TypedRunnableModel>),
    #[cfg(any(feature = "cuda", feature = "cuda-12"))]
    Gpu(cuda::GpuPlan),
}

impl Plan {
    fn run(
        &self,
        input: tract_onnx::prelude::Tensor,
    ) -> TractResult<TVec<tract_onnx::prelude::TValue>> {
        match self {
            Plan::Cpu(plan) => plan.run(tvec![input.into_tvalue()]),
            #[cfg(any(feature = "cuda", feature = "cuda-12"))]
            Plan::Gpu(plan) => plan.run(input),
        }
    }
}

/// A loaded ONNX model.
pub struct TractModel {
    plan: Plan,
    input: TensorInfo,
    output: TensorInfo,
    batching: Batching,
    pool: rayon::ThreadPool,
}

fn load_error(path: &Path, message: impl Into<String>) -> BackendError {
    BackendError::Load {
        path: path.display().to_string(),
        message: message.into(),
    }
}

impl TractModel {
    /// Loads `path` for the CPU.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self, BackendError> {
        Self::load_on(path, opts, Device::Cpu)
    }

    fn load_on(path: &Path, opts: &LoadOptions, device: Device) -> Result<Self, BackendError> {
        let err = |m: String| load_error(path, m);
        // A machine without CUDA is told before the model is looked at.
        #[cfg(any(feature = "cuda", feature = "cuda-12"))]
        let gpu = match device {
            Device::Cuda => {
                let rt = cuda::runtime()?;
                cuda::device(opts).map_err(|e| err(e.into_message()))?;
                Some(rt)
            }
            Device::Cpu => None,
        };
        if let Err(e) = std::fs::metadata(path) {
            return Err(err(format!("cannot read the model file: {e}")));
        }
        // Every backend of a chain gets the profile's precision; tract has
        // no reduced-precision mode to switch on, which is worth a warning,
        // not a failed load.
        match precision_note(opts, device) {
            Ok(Some(note)) => tracing::warn!("tract: {note}"),
            Ok(None) => {}
            Err(e) => return Err(err(e.into_message())),
        }
        for key in opts
            .extra
            .keys()
            .filter(|k| !OPTION_KEYS.contains(&k.as_str()))
        {
            tracing::warn!("tract: ignoring unknown load option `{key}`");
        }
        let model = tract_onnx::onnx()
            .model_for_path(path)
            .map_err(|e| err(format!("not a model tract can read: {e:#}")))?;
        if model.inputs.len() != 1 || model.outputs.len() != 1 {
            return Err(err(format!(
                "infl8 needs one input and one output, the model has {} and {}",
                model.inputs.len(),
                model.outputs.len()
            )));
        }
        let (typed, batch) = ShapedModel::new(model)
            .and_then(ShapedModel::into_typed)
            .map_err(err)?;

        let info = |outlets: TractResult<&[OutletId]>| {
            let outlet = outlets
                .map_err(|e| err(format!("{e:#}")))?
                .first()
                .copied()
                .ok_or_else(|| err("the typed model lost its input or output".into()))?;
            let fact: &TypedFact = typed
                .outlet_fact(outlet)
                .map_err(|e| err(format!("{e:#}")))?;
            let name = typed
                .outlet_label(outlet)
                .unwrap_or(&typed.node(outlet.node).name)
                .to_owned();
            Ok::<_, BackendError>(TensorInfo {
                name,
                shape: describe(&fact.shape, &batch, &typed),
            })
        };
        let input = info(typed.input_outlets())?;
        let output = info(typed.output_outlets())?;
        let batching = match (input.shape.first(), output.shape.first()) {
            (Some(Dim::Symbolic(_)), Some(Dim::Symbolic(_))) if device == Device::Cpu => {
                Batching::ItemsInParallel
            }
            (Some(Dim::Symbolic(_)), Some(Dim::Symbolic(_))) => Batching::WholeBatch,
            (Some(Dim::Fixed(_)), _) => Batching::WholeBatch,
            (_, out) => {
                return Err(err(format!(
                    "the output's first dimension ({}) is not the batch; infl8 needs \
                     batch-first outputs",
                    out.map_or_else(|| "none".to_owned(), |d| d.to_string())
                )));
            }
        };

        let runnable = match (&batching, &batch) {
            // One item at a time: specialise the plan to batch 1.
            (Batching::ItemsInParallel, BatchDim::Symbol(n)) => {
                let subs = HashMap::from([(n.clone(), TDim::Val(1))]);
                typed.set_symbols(&subs)
            }
            _ => Ok(typed),
        };
        let typed = runnable.map_err(|e| err(format!("{e:#}")))?;
        let plan = match device {
            Device::Cpu => Plan::Cpu(
                typed
                    .into_optimized()
                    .and_then(|m| m.into_runnable())
                    .map_err(|e| err(format!("tract cannot optimise the model: {e:#}")))?,
            ),
            #[cfg(any(feature = "cuda", feature = "cuda-12"))]
            Device::Cuda => {
                let precision = opts
                    .requested_precision()
                    .map_err(|e| err(e.into_message()))?;
                let rt = gpu.ok_or_else(|| err("internal: no CUDA runtime".into()))?;
                Plan::Gpu(cuda::prepare(rt, typed, precision).map_err(err)?)
            }
        };

        let threads = match opts.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("infl8-tract-{i}"))
            .build()
            .map_err(|e| err(format!("cannot start {threads} worker threads: {e}")))?;

        tracing::debug!(
            model = %path.display(),
            input = %input,
            output = %output,
            threads,
            "tract model loaded"
        );
        Ok(TractModel {
            plan,
            input,
            output,
            batching,
            pool,
        })
    }

    /// Runs one tract invocation on `data` of `shape`; returns the output's
    /// shape and values (f32, cast if the model says otherwise).
    fn invoke<R>(
        &self,
        data: &[f32],
        shape: &[usize],
        take: impl FnOnce(&[usize], &[f32]) -> Result<R, BackendError>,
    ) -> Result<R, BackendError> {
        let run_error = |e: tract_onnx::prelude::TractError| BackendError::Run(format!("{e:#}"));
        let tensor = tract_onnx::prelude::Tensor::from_shape(shape, data).map_err(run_error)?;
        let outputs = self.plan.run(tensor).map_err(run_error)?;
        let out = outputs
            .first()
            .ok_or_else(|| BackendError::Run("the model produced no output".into()))?;
        let out = out.cast_to::<f32>().map_err(run_error)?;
        let view = out.try_as_plain_ram().map_err(run_error)?;
        let values = view.as_slice::<f32>().map_err(run_error)?;
        take(out.shape(), values)
    }

    /// One invocation per item, in parallel on the model's pool.
    fn run_items(&self, data: &[f32], shape: &[usize]) -> Result<Tensor, BackendError> {
        let split = Split::new(data, shape, 1)?;
        let parts: Vec<Part<'_>> = split.parts().collect();
        let outputs: Vec<Tensor> = self.pool.install(|| {
            parts
                .par_iter()
                .map(|part| {
                    self.invoke(part.data, &part.shape, |got, values| {
                        Tensor::from_vec(got.to_vec(), values.to_vec())
                    })
                })
                .collect::<Result<_, _>>()
        })?;
        split.concat(outputs, &self.output)
    }
}

impl Model for TractModel {
    fn input(&self) -> &TensorInfo {
        &self.input
    }

    fn output(&self) -> &TensorInfo {
        &self.output
    }

    fn run(&self, data: &[f32], shape: &[usize]) -> Result<Tensor, BackendError> {
        self.input.check_run_input(data.len(), shape)?;
        match self.batching {
            Batching::ItemsInParallel => self.run_items(data, shape),
            Batching::WholeBatch => self.invoke(data, shape, |got, values| {
                Tensor::from_vec(got.to_vec(), values.to_vec())
            }),
        }
    }
}

/// Where the batch dimension stands after preparing the input fact.
enum BatchDim {
    /// Symbolic: any batch runs.
    Symbol(Symbol),
    /// The file fixes a batch other than 1.
    Fixed(usize),
}

/// An ONNX model with its input fact pinned to f32, a batch symbol and
/// every other dimension known or symbolic.
struct ShapedModel {
    model: InferenceModel,
    batch: BatchDim,
    /// The file said batch 1: if typing with a symbolic batch fails (a
    /// reshape that hard-codes the 1), fall back to it, since items run at
    /// batch 1 anyway.
    fixed_one: Option<InferenceModel>,
}

impl ShapedModel {
    fn new(mut model: InferenceModel) -> Result<Self, String> {
        let fact = model.input_fact(0).map_err(|e| format!("{e:#}"))?.clone();
        if fact.shape.is_open() {
            return Err("the model's input has no declared rank".into());
        }
        let dims: Vec<GenericFactoid<TDim>> = fact.shape.dims().cloned().collect();
        let Some(first) = dims.first() else {
            return Err("the model's input is a scalar; infl8 needs a batch dimension".into());
        };
        let (batch, was_one) = match first {
            GenericFactoid::Only(TDim::Sym(s)) => (BatchDim::Symbol(s.clone()), false),
            GenericFactoid::Only(d) => match d.as_i64() {
                Some(1) => (BatchDim::Symbol(model.symbols.new_with_prefix("N")), true),
                Some(n) if n > 1 => (BatchDim::Fixed(n as usize), false),
                _ => return Err(format!("unsupported batch dimension `{d}`")),
            },
            GenericFactoid::Any => (BatchDim::Symbol(model.symbols.new_with_prefix("N")), false),
        };
        let rest = dims[1..]
            .iter()
            .map(|d| match d {
                GenericFactoid::Only(d) => d.clone(),
                GenericFactoid::Any => TDim::Sym(model.symbols.new_with_prefix("d")),
            })
            .collect::<Vec<_>>();
        let shape_with =
            |b: TDim| -> TVec<TDim> { std::iter::once(b).chain(rest.iter().cloned()).collect() };
        let fixed_one = if was_one {
            let mut m = model.clone();
            m.set_input_fact(
                0,
                InferenceFact::dt_shape(f32::datum_type(), shape_with(TDim::Val(1))),
            )
            .map_err(|e| format!("{e:#}"))?;
            Some(m)
        } else {
            None
        };
        let b = match &batch {
            BatchDim::Symbol(s) => TDim::Sym(s.clone()),
            BatchDim::Fixed(n) => TDim::Val(*n as i64),
        };
        model
            .set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape_with(b)))
            .map_err(|e| format!("{e:#}"))?;
        Ok(ShapedModel {
            model,
            batch,
            fixed_one,
        })
    }

    /// Types and declutters the model, keeping the batch symbolic if tract
    /// can.
    fn into_typed(self) -> Result<(TypedModel, BatchDim), String> {
        let typed =
            |m: InferenceModel| -> TractResult<TypedModel> { m.into_typed()?.into_decluttered() };
        let ShapedModel {
            model,
            batch,
            fixed_one,
        } = self;
        // A symbolic batch must also come out first: a model exported at
        // batch 1 may reshape to a hard-coded 1, which types fine but loses
        // the batch. Such a model still runs item by item at its batch of 1.
        let batch_follows = |t: &TypedModel| match &batch {
            BatchDim::Symbol(s) => t
                .output_fact(0)
                .is_ok_and(|f| f.shape.first() == Some(&TDim::Sym(s.clone()))),
            BatchDim::Fixed(_) => true,
        };
        let symbolic = typed(model);
        let fixed_one = match (symbolic, fixed_one) {
            (Ok(t), None) => return Ok((t, batch)),
            (Ok(t), Some(_)) if batch_follows(&t) => return Ok((t, batch)),
            (Err(e), None) => return Err(format!("tract cannot analyse the model: {e:#}")),
            (Ok(_), Some(m)) => {
                tracing::debug!("tract: the batch does not reach the output; using the file's 1");
                m
            }
            (Err(e), Some(m)) => {
                tracing::debug!("tract: a symbolic batch failed ({e:#}); using the file's 1");
                m
            }
        };
        typed(fixed_one)
            .map(|t| (t, batch))
            .map_err(|e| format!("tract cannot analyse the model: {e:#}"))
    }
}

/// A tract shape as infl8 dimensions. The first dimension is the batch when
/// it is the batch symbol, or 1 in a model typed at batch 1 (the fallback):
/// both run any batch.
fn describe(shape: &[TDim], batch: &BatchDim, typed: &TypedModel) -> Vec<Dim> {
    let batch_name = match batch {
        BatchDim::Symbol(s) => Some(s.to_string()),
        BatchDim::Fixed(_) => None,
    };
    let typed_at_one = batch_name.is_some() && !mentions_symbol(typed, batch);
    shape
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let is_batch = i == 0
                && match (batch, d) {
                    (BatchDim::Symbol(s), TDim::Sym(t)) => s == t,
                    (BatchDim::Symbol(_), d) => typed_at_one && d.as_i64() == Some(1),
                    (BatchDim::Fixed(_), _) => false,
                };
            if is_batch {
                Dim::Symbolic(batch_name.clone().unwrap_or_else(|| "N".into()))
            } else {
                match d.as_i64() {
                    Some(n) if n >= 0 => Dim::Fixed(n as usize),
                    _ => Dim::Symbolic(d.to_string()),
                }
            }
        })
        .collect()
}

/// Does the typed model's input still carry the batch symbol (or did typing
/// fall back to batch 1)?
fn mentions_symbol(typed: &TypedModel, batch: &BatchDim) -> bool {
    match (batch, typed.input_fact(0)) {
        (BatchDim::Symbol(s), Ok(f)) => f.shape.first() == Some(&TDim::Sym(s.clone())),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example model (a 3D conv head mask over 8^3 windows) in `dir`.
    fn example_model(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("m.onnx");
        let model = infl8_onnx::examples::head_mask_model([8, 8, 8], 0.5, 10.0);
        infl8_onnx::write_model(&model, &path).unwrap();
        path
    }

    /// Load options with one `extra` key.
    fn with_option(key: &str, value: serde_json::Value) -> LoadOptions {
        let mut extra = serde_json::Map::new();
        extra.insert(key.into(), value);
        LoadOptions {
            threads: 1,
            extra,
            ..Default::default()
        }
    }

    #[test]
    fn precision_is_accepted_and_a_bad_one_names_the_option() {
        let dir = tempfile::tempdir().unwrap();
        let path = example_model(dir.path());
        let opts = |precision: &str| with_option("precision", precision.into());
        // fp16/int8 only warn: the profile's precision reaches every backend
        // of a chain, tract as the last fallback included.
        for p in ["fp32", "fp16", "int8"] {
            TractModel::load(&path, &opts(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
        }
        let e = TractModel::load(&path, &opts("fp8"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("precision") && e.contains("fp8"), "{e}");
    }

    /// Without CUDA (CI, most desktops) `tract-cuda` is unavailable, never
    /// broken, so a chain falls back; with a GPU it runs the model as the
    /// CPU does.
    #[cfg(any(feature = "cuda", feature = "cuda-12"))]
    #[test]
    fn tract_cuda_is_unavailable_without_cuda_and_equal_to_the_cpu_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = example_model(dir.path());
        let gpu = TractBackend::cuda();
        assert_eq!(gpu.name(), "tract-cuda");
        let opts = LoadOptions::default();
        match cuda::runtime() {
            Err(e) => {
                let got = gpu.load(&path, &opts).err().unwrap();
                assert!(matches!(got, BackendError::Unavailable(_)), "{got}");
                assert!(got.to_string().contains("tract-cuda"), "{got}");
                assert!(matches!(e, BackendError::Unavailable(_)));
            }
            Ok(_) => {
                let cpu = TractBackend::new().load(&path, &opts).unwrap();
                let gpu = gpu.load(&path, &opts).unwrap();
                let shape = [2, 1, 8, 8, 8];
                let data: Vec<f32> = (0..1024).map(|i| (i % 17) as f32 / 8.0).collect();
                let a = cpu.run(&data, &shape).unwrap();
                let b = gpu.run(&data, &shape).unwrap();
                assert_eq!(a.shape(), b.shape());
                let diff = a
                    .data()
                    .iter()
                    .zip(b.data())
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0f32, f32::max);
                assert!(diff < 1e-3, "{diff}");
            }
        }
    }

    #[cfg(any(feature = "cuda", feature = "cuda-12"))]
    #[test]
    fn tract_cuda_options_are_checked() {
        let opts = with_option;
        let gpu = TractBackend::cuda();
        assert!(
            gpu.check_options(&opts("device", 0.into()))
                .unwrap()
                .is_empty()
        );
        let e = gpu.check_options(&opts("device", 1.into())).unwrap_err();
        assert!(e.to_string().contains("CUDA_VISIBLE_DEVICES"), "{e}");
        let e = gpu
            .check_options(&opts("device", "gpu".into()))
            .unwrap_err();
        assert!(
            e.to_string().contains("device: expected a GPU index"),
            "{e}"
        );
        // fp16 is the GPU's to honour; the CPU notes it cannot.
        assert!(
            gpu.check_options(&opts("precision", "fp16".into()))
                .unwrap()
                .is_empty()
        );
        let cpu = TractBackend::new();
        let notes = cpu
            .check_options(&opts("precision", "fp16".into()))
            .unwrap();
        assert!(
            notes[0].starts_with("precision: fp16 has no switch"),
            "{notes:?}"
        );
        let notes = cpu.check_options(&opts("device", 0.into())).unwrap();
        assert!(
            notes[0].starts_with("device: tract does not read it"),
            "{notes:?}"
        );
        let e = cpu.check_options(&opts("threads", 2.into())).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid argument: threads: not an option"),
            "{e}"
        );
    }
}
