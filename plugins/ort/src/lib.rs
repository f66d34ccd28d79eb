//! infl8 backend plugin `ort`: ONNX Runtime through the `ort` crate, with
//! three backends that differ in their execution provider:
//!
//! - `ort-cpu`: the CPU execution provider, `LoadOptions::threads` intra-op
//!   threads;
//! - `ort-cuda`: the CUDA execution provider (nodes it lacks run on CPU);
//! - `ort-tensorrt`: TensorRT, with CUDA then CPU for what TensorRT does not
//!   take; `trt_*` load options (fp16, int8, engine and timing caches,
//!   workspace, DLA core), and the settings' `precision` (`fp16` / `int8`
//!   switch TensorRT's FP16 / INT8 kernels on; on the other two it is a
//!   warning: they run the model's own precision).
//!
//! ONNX Runtime is loaded at run time (`load-dynamic`) from the `library`
//! load option, `ORT_DYLIB_PATH`, `onnxruntime/` next to this library, the
//! per-user data folder, or the system loader (see [`runtime`]).
//! A missing library, a build without the requested execution provider or a
//! provider that cannot start (missing CUDA libraries, no driver) is a
//! [`BackendError::Unavailable`] naming what is missing (the machine cannot
//! run the backend; a broken library or model is a load error): these
//! backends never quietly run on CPU.
//! Falling back to another backend is the host's decision (the settings'
//! backend chain).
//!
//! A batch runs as one `Session::run` when the model's batch dimension is
//! symbolic; the output stays in ONNX Runtime's buffer, handed to the host
//! without a copy. A model exported with a fixed batch of 1 runs item by
//! item.

pub mod options;
pub mod runtime;

use std::path::Path;
use std::sync::{Mutex, PoisonError};

use infl8_backend::batch::{self, Split};
use infl8_backend::{
    Backend, BackendError, Dim, ForeignBuffer, LoadOptions, Model, Tensor, TensorInfo,
};
use ort::session::Session;
use ort::session::builder::{AutoDevicePolicy, SessionBuilder};
use ort::value::{DynValue, Outlet, TensorElementType, TensorRef, ValueType};

use crate::options::{OptionError, OrtOptions, Parsed};
use crate::runtime::{LibraryRequest, Runtime};

infl8_backend::export_plugin! {
    name: "ort",
    version: env!("CARGO_PKG_VERSION"),
    backends: [
        Box::new(OrtBackend::new(Provider::Cpu)),
        Box::new(OrtBackend::new(Provider::Cuda)),
        Box::new(OrtBackend::new(Provider::TensorRt)),
    ],
}

/// The execution provider a backend runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    Cpu,
    Cuda,
    TensorRt,
}

impl Provider {
    pub const ALL: [Provider; 3] = [Provider::Cpu, Provider::Cuda, Provider::TensorRt];

    /// The infl8 backend name.
    pub fn backend_name(self) -> &'static str {
        match self {
            Provider::Cpu => "ort-cpu",
            Provider::Cuda => "ort-cuda",
            Provider::TensorRt => "ort-tensorrt",
        }
    }

    /// ONNX Runtime's name for the execution provider.
    pub fn ep_name(self) -> &'static str {
        match self {
            Provider::Cpu => "CPUExecutionProvider",
            Provider::Cuda => "CUDAExecutionProvider",
            Provider::TensorRt => "TensorrtExecutionProvider",
        }
    }

    /// The shared library ONNX Runtime loads for the provider.
    fn provider_library(self) -> Option<&'static str> {
        match self {
            Provider::Cpu => None,
            Provider::Cuda => Some("libonnxruntime_providers_cuda.so"),
            Provider::TensorRt => Some("libonnxruntime_providers_tensorrt.so"),
        }
    }

    /// Was this plugin built with the provider's registration code?
    fn compiled_in(self) -> bool {
        match self {
            Provider::Cpu => true,
            Provider::Cuda => cfg!(feature = "cuda"),
            Provider::TensorRt => cfg!(feature = "tensorrt"),
        }
    }

    fn cargo_feature(self) -> &'static str {
        match self {
            Provider::Cpu => "",
            Provider::Cuda => "cuda",
            Provider::TensorRt => "tensorrt",
        }
    }
}

/// One of the plugin's backends.
pub struct OrtBackend {
    provider: Provider,
}

impl OrtBackend {
    pub fn new(provider: Provider) -> Self {
        OrtBackend { provider }
    }
}

impl Backend for OrtBackend {
    fn name(&self) -> &str {
        self.provider.backend_name()
    }

    fn description(&self) -> &str {
        match self.provider {
            Provider::Cpu => "ONNX Runtime, CPU execution provider",
            Provider::Cuda => "ONNX Runtime, CUDA execution provider (NVIDIA GPU)",
            Provider::TensorRt => "ONNX Runtime, TensorRT execution provider (NVIDIA GPU/DLA)",
        }
    }

    fn load(&self, model: &Path, opts: &LoadOptions) -> Result<Box<dyn Model>, BackendError> {
        Ok(Box::new(OrtModel::load(model, self.provider, opts)?))
    }

    fn check_options(&self, opts: &LoadOptions) -> Result<Vec<String>, BackendError> {
        let parsed = parse_options(opts, self.provider)
            .map_err(|e| BackendError::InvalidArgument(format!("{}: {}", e.key, e.message)))?;
        if let Some(key) = parsed.unknown.first() {
            return Err(BackendError::InvalidArgument(format!(
                "{key}: not an option of the ort plugin (it reads {})",
                options::ALL_KEYS.join(", ")
            )));
        }
        let name = self.provider.backend_name();
        let mut notes: Vec<String> = parsed
            .other_backend
            .iter()
            .map(|key| format!("{key}: {name} does not read it (another ort backend does)"))
            .collect();
        notes.extend(parsed.warnings);
        Ok(notes)
    }
}

/// The plugin's options as `provider` reads them; `extra`'s own
/// `precision` (a backend table's) wins over the typed one.
fn parse_options(opts: &LoadOptions, provider: Provider) -> Result<Parsed, OptionError> {
    let mut extra = opts.extra.clone();
    extra
        .entry(options::KEY_PRECISION)
        .or_insert_with(|| opts.precision.as_str().into());
    OrtOptions::parse(&extra, provider)
}

fn load_error(path: &Path, message: impl Into<String>) -> BackendError {
    BackendError::Load {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// How a batch maps onto `Session::run` calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Batching {
    /// The batch dimension is symbolic (or fixed above 1): the whole batch
    /// in one run.
    OneRun,
    /// The file fixes a batch of 1: one run per item, in order.
    ItemByItem,
}

/// A model in an ONNX Runtime session.
pub struct OrtModel {
    /// `Session::run` takes `&mut self` (ONNX Runtime's `Run` is not safe to
    /// call concurrently on every provider), so runs take turns.
    session: Mutex<Session>,
    provider: Provider,
    input: TensorInfo,
    output: TensorInfo,
    output_name: String,
    batching: Batching,
}

impl OrtModel {
    pub fn load(path: &Path, provider: Provider, opts: &LoadOptions) -> Result<Self, BackendError> {
        let err = |m: String| load_error(path, m);
        let name = provider.backend_name();
        let parsed = parse_options(opts, provider).map_err(|e| err(e.to_string()))?;
        for key in &parsed.unknown {
            tracing::warn!("{name}: ignoring unknown load option `{key}`");
        }
        for key in &parsed.other_backend {
            tracing::debug!("{name}: load option `{key}` is for another ort backend");
        }
        for warning in &parsed.warnings {
            tracing::warn!("{name}: {warning}");
        }
        let options = parsed.options;
        if let Err(e) = std::fs::metadata(path) {
            return Err(err(format!("cannot read the model file: {e}")));
        }
        if !provider.compiled_in() {
            return Err(BackendError::Unavailable(format!(
                "{name}: this build of the ort plugin has no {} support (build infl8-plugin-ort \
                 with `--features {}`)",
                provider.ep_name(),
                provider.cargo_feature()
            )));
        }
        let request = LibraryRequest::from_env(options.library.as_deref());
        let rt = runtime::runtime(&request).map_err(|e| {
            let message = format!("{name}: {e}");
            if e.is_missing() {
                BackendError::Unavailable(message)
            } else {
                err(message)
            }
        })?;
        if !rt.has_provider(provider.ep_name()) {
            return Err(BackendError::Unavailable(format!(
                "{name}: the ONNX Runtime at {} ({}) has no {} (it offers {}); use a GPU build \
                 of ONNX Runtime: `scripts/fetch-ort.sh --gpu` (onnxruntime-gpu, x86_64) or \
                 JetPack's on Jetson",
                rt.library.display(),
                rt.version,
                provider.ep_name(),
                rt.providers.join(", "),
            )));
        }

        let session = build_session(path, provider, opts, &options, rt)?;
        let (input, output, batching) = describe_io(&session).map_err(err)?;
        let output_name = session
            .outputs()
            .first()
            .map(|o| o.name().to_owned())
            .unwrap_or_default();
        tracing::debug!(
            model = %path.display(),
            backend = name,
            input = %input,
            output = %output,
            threads = opts.threads,
            "ONNX Runtime session ready"
        );
        Ok(OrtModel {
            session: Mutex::new(session),
            provider,
            input,
            output,
            output_name,
            batching,
        })
    }

    /// One `Session::run` on `data` of `shape`.
    fn invoke(&self, data: &[f32], shape: &[usize]) -> Result<DynValue, BackendError> {
        let run_error =
            |e: ort::Error| BackendError::Run(format!("{}: {e}", self.provider.backend_name()));
        let tensor = TensorRef::from_array_view((shape.to_vec(), data)).map_err(run_error)?;
        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        let mut outputs = session.run(ort::inputs![tensor]).map_err(run_error)?;
        outputs.remove(self.output_name.as_str()).ok_or_else(|| {
            BackendError::Run(format!(
                "the model produced no output named `{}`",
                self.output_name
            ))
        })
    }

    fn run_items(&self, data: &[f32], shape: &[usize]) -> Result<Tensor, BackendError> {
        Split::new(data, shape, 1)?.run_in_order(&self.output, |item, item_shape| {
            let value = self.invoke(item, item_shape)?;
            let (dims, _) = extract(&value)?;
            Tensor::from_foreign(dims, Box::new(OrtBuffer(value)))
        })
    }

    fn run_whole(&self, data: &[f32], shape: &[usize]) -> Result<Tensor, BackendError> {
        let value = self.invoke(data, shape)?;
        let (dims, _) = extract(&value)?;
        if dims.first() != shape.first() {
            return Err(BackendError::Run(format!(
                "the model produced shape {dims:?} for a batch of {}; infl8 needs batch-first \
                 outputs",
                shape[0]
            )));
        }
        // No copy: the host reads ONNX Runtime's output buffer, released
        // when the host frees the tensor.
        Tensor::from_foreign(dims, Box::new(OrtBuffer(value)))
    }
}

impl Model for OrtModel {
    fn input(&self) -> &TensorInfo {
        &self.input
    }

    fn output(&self) -> &TensorInfo {
        &self.output
    }

    fn run(&self, data: &[f32], shape: &[usize]) -> Result<Tensor, BackendError> {
        self.input.check_run_input(data.len(), shape)?;
        if shape.first() == Some(&0) {
            // Answered without calling ONNX Runtime.
            return batch::empty_output(shape, &self.output);
        }
        match self.batching {
            Batching::OneRun => self.run_whole(data, shape),
            Batching::ItemByItem => self.run_items(data, shape),
        }
    }
}

/// An output tensor of ONNX Runtime, owned until the host frees it.
struct OrtBuffer(DynValue);

impl ForeignBuffer for OrtBuffer {
    fn as_slice(&self) -> &[f32] {
        // Checked to be an f32 tensor when wrapped; the fallback cannot
        // happen and would show as a length mismatch.
        self.0
            .try_extract_tensor::<f32>()
            .map(|(_, data)| data)
            .unwrap_or(&[])
    }
}

/// An output's shape and f32 values.
fn extract(value: &DynValue) -> Result<(Vec<usize>, &[f32]), BackendError> {
    let (shape, data) = value
        .try_extract_tensor::<f32>()
        .map_err(|e| BackendError::Run(format!("the model's output is not an f32 tensor: {e}")))?;
    let dims = shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| BackendError::Run(format!("the output has a negative dimension: {shape}")))?;
    Ok((dims, data))
}

/// A session for `path` on `provider`, or why not.
fn build_session(
    path: &Path,
    provider: Provider,
    opts: &LoadOptions,
    options: &OrtOptions,
    rt: &Runtime,
) -> Result<Session, BackendError> {
    let name = provider.backend_name();
    let setup = |e: ort::Error<SessionBuilder>| {
        load_error(path, format!("{name}: cannot configure the session: {e}"))
    };
    let mut builder = Session::builder(&rt.env)
        .map_err(|e| load_error(path, format!("{name}: cannot create a session: {e}")))?
        .with_log_level(runtime::session_log_level())
        .map_err(setup)?
        // Only the providers registered below: never one ONNX Runtime
        // picks by itself.
        .with_auto_device(AutoDevicePolicy::PreferCPU)
        .map_err(setup)?;
    if opts.threads > 0 {
        builder = builder
            .with_intra_threads(opts.threads)
            .map_err(setup)?
            .with_inter_threads(1)
            .map_err(setup)?;
    }
    if provider != Provider::Cpu {
        register_gpu(&mut builder, provider, options)
            .map_err(|e| gpu_failure(path, provider, rt, "cannot register", &e))?;
    }
    builder.commit_from_file(path).map_err(|e| {
        if provider == Provider::Cpu {
            load_error(
                path,
                format!("{name}: ONNX Runtime cannot load the model: {e}"),
            )
        } else {
            gpu_failure(
                path,
                provider,
                rt,
                "cannot start a session with",
                &e.to_string(),
            )
        }
    })
}

/// Registers the provider's execution providers, erroring (not falling back
/// to CPU) when one cannot be registered.
#[cfg(feature = "cuda")]
fn register_gpu(
    builder: &mut SessionBuilder,
    provider: Provider,
    options: &OrtOptions,
) -> Result<(), String> {
    use ort::ep::ExecutionProvider;

    let device = i32::try_from(options.device_id.unwrap_or(0))
        .map_err(|_| "device_id is out of range".to_owned())?;
    #[cfg(feature = "tensorrt")]
    if provider == Provider::TensorRt {
        tensorrt(&options.trt, device)?
            .register(builder)
            .map_err(|e| e.to_string())?;
    }
    #[cfg(not(feature = "tensorrt"))]
    if provider == Provider::TensorRt {
        return Err("the plugin was built without the `tensorrt` feature".into());
    }
    // TensorRT hands what it cannot take to CUDA, then CPU.
    ort::ep::CUDA::default()
        .with_device_id(device)
        .register(builder)
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "cuda"))]
fn register_gpu(
    _builder: &mut SessionBuilder,
    _provider: Provider,
    _options: &OrtOptions,
) -> Result<(), String> {
    Err("the plugin was built without the `cuda` feature".into())
}

/// The TensorRT execution provider from the `trt_*` options.
#[cfg(feature = "tensorrt")]
fn tensorrt(o: &options::TrtOptions, device: i32) -> Result<ort::ep::TensorRT, String> {
    let mut trt = ort::ep::TensorRT::default().with_device_id(device);
    if let Some(b) = o.fp16 {
        trt = trt.with_fp16(b);
    }
    if let Some(b) = o.int8 {
        trt = trt.with_int8(b);
    }
    let dir = |key: &str, d: &Path| -> Result<String, String> {
        std::fs::create_dir_all(d)
            .map_err(|e| format!("{key}: cannot create {}: {e}", d.display()))?;
        d.to_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{key}: {} is not valid UTF-8", d.display()))
    };
    if let Some(d) = &o.engine_cache_dir {
        let d = dir(options::KEY_TRT_ENGINE_CACHE_DIR, d)?;
        trt = trt.with_engine_cache(true).with_engine_cache_path(d);
    }
    if let Some(d) = &o.timing_cache_dir {
        let d = dir(options::KEY_TRT_TIMING_CACHE_DIR, d)?;
        trt = trt.with_timing_cache(true).with_timing_cache_path(d);
    }
    if let Some(n) = o.workspace_size {
        let n = usize::try_from(n).map_err(|_| "trt_workspace_size is out of range".to_owned())?;
        trt = trt.with_max_workspace_size(n);
    }
    if let Some(core) = o.dla_core {
        trt = trt.with_dla(true).with_dla_core(core);
    }
    Ok(trt)
}

/// The error for a GPU provider that failed, with what is missing where
/// that can be found out: the NVIDIA driver, or a library the provider
/// needs (the loader names it, e.g. `libcublasLt.so.12`). Something missing
/// makes the backend unavailable here; else the model or setup is at fault.
fn gpu_failure(
    path: &Path,
    provider: Provider,
    rt: &Runtime,
    what: &str,
    error: &str,
) -> BackendError {
    let mut msg = format!(
        "{}: {what} the {} of the ONNX Runtime at {}: {}",
        provider.backend_name(),
        provider.ep_name(),
        rt.library.display(),
        error.trim()
    );
    let findings = diagnose_gpu(provider, rt);
    for finding in &findings {
        msg.push_str("; ");
        msg.push_str(finding);
    }
    if findings.is_empty() {
        load_error(path, msg)
    } else {
        BackendError::Unavailable(msg)
    }
}

/// What stands between this machine and the provider, as far as loading
/// the libraries involved tells.
fn diagnose_gpu(provider: Provider, rt: &Runtime) -> Vec<String> {
    let mut findings = Vec::new();
    // SAFETY: loading a system library runs its initialisers; the NVIDIA
    // driver's are what the CUDA runtime would run anyway.
    match unsafe { libloading::Library::new("libcuda.so.1") } {
        // Keep it loaded: unloading CUDA libraries is not reliably safe.
        Ok(lib) => std::mem::forget(lib),
        Err(e) => findings.push(format!(
            "no NVIDIA driver: libcuda.so.1 cannot be loaded ({})",
            runtime::dl_error(&e)
        )),
    }
    if let Some(lib) = provider.provider_library() {
        let path = match rt.library_dir() {
            Some(dir) => dir.join(lib),
            None => lib.into(),
        };
        // SAFETY: the provider library is part of the ONNX Runtime in use,
        // which would load it itself; only its loader error is wanted.
        match unsafe { libloading::Library::new(&path) } {
            Ok(l) => std::mem::forget(l),
            Err(e) => {
                let text = runtime::dl_error(&e);
                // The loader names the first library it cannot find.
                let missing = text
                    .split(':')
                    .map(str::trim)
                    .find(|s| s.contains(".so") && !s.contains(lib))
                    .filter(|_| text.contains("cannot open shared object file"));
                findings.push(match missing {
                    Some(m) => format!("{} needs {m}, which cannot be found", path.display()),
                    None => format!("{} cannot be loaded: {text}", path.display()),
                });
            }
        }
    }
    findings
}

/// The model's input and output as infl8 sees them, and how batches run.
fn describe_io(session: &Session) -> Result<(TensorInfo, TensorInfo, Batching), String> {
    if session.inputs().len() != 1 || session.outputs().len() != 1 {
        return Err(format!(
            "infl8 needs one input and one output, the model has {} and {}",
            session.inputs().len(),
            session.outputs().len()
        ));
    }
    let (input, in_batch) = tensor_info(&session.inputs()[0], "input")?;
    let (mut output, _) = tensor_info(&session.outputs()[0], "output")?;
    let batching = match in_batch {
        Some(1) => {
            // A file exported at batch 1 runs item by item: any batch fits.
            Batching::ItemByItem
        }
        _ => Batching::OneRun,
    };
    let mut input = input;
    if batching == Batching::ItemByItem {
        input.shape[0] = Dim::Symbolic("N".into());
        if let Some(first) = output.shape.first_mut()
            && matches!(first, Dim::Fixed(1) | Dim::Symbolic(_))
        {
            *first = Dim::Symbolic("N".into());
        }
    }
    Ok((input, output, batching))
}

/// An f32 tensor's name and shape, and its fixed first dimension if any.
fn tensor_info(outlet: &Outlet, what: &str) -> Result<(TensorInfo, Option<usize>), String> {
    let ValueType::Tensor {
        ty,
        shape,
        dimension_symbols,
    } = outlet.dtype()
    else {
        return Err(format!(
            "the model's {what} `{}` is not a tensor ({})",
            outlet.name(),
            outlet.dtype()
        ));
    };
    if *ty != TensorElementType::Float32 {
        return Err(format!(
            "the model's {what} `{}` is {ty}; infl8 exchanges f32 tensors",
            outlet.name()
        ));
    }
    if shape.is_empty() {
        return Err(format!(
            "the model's {what} `{}` is a scalar; infl8 needs a batch dimension",
            outlet.name()
        ));
    }
    let dims = shape
        .iter()
        .enumerate()
        .map(|(i, &d)| match usize::try_from(d) {
            Ok(n) => Dim::Fixed(n),
            Err(_) => Dim::Symbolic(
                dimension_symbols
                    .get(i)
                    .filter(|s| !s.is_empty())
                    .cloned()
                    .unwrap_or_else(|| if i == 0 { "N".into() } else { format!("d{i}") }),
            ),
        })
        .collect::<Vec<_>>();
    let first = dims[0].fixed();
    Ok((
        TensorInfo {
            name: outlet.name().to_owned(),
            shape: dims,
        },
        first,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_and_providers() {
        let names: Vec<_> = Provider::ALL.iter().map(|p| p.backend_name()).collect();
        assert_eq!(names, ["ort-cpu", "ort-cuda", "ort-tensorrt"]);
        assert_eq!(Provider::TensorRt.ep_name(), "TensorrtExecutionProvider");
        assert_eq!(OrtBackend::new(Provider::Cuda).name(), "ort-cuda");
    }
}
