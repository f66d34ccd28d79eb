//! The `tract-cuda` backend's GPU side: tract's CUDA runtime (tract-cuda,
//! the same tract release as the CPU backend) rewrites a decluttered model's
//! convolutions, matrix products and attention onto CUDA kernels and leaves
//! the rest on the CPU.
//!
//! CUDA is loaded when first needed (cudarc's dynamic loading), so the
//! plugin builds and loads on machines without it. Two things tract-cuda
//! does are guarded here: its availability check is the only call that
//! returns an error for a missing driver or library, so it runs before
//! anything else and its failure is [`BackendError::Unavailable`]; and it
//! creates its CUDA context with `expect` (a missing toolkit header for the
//! kernels it compiles with NVRTC, an unwritable kernel cache), so
//! preparing the model runs under `catch_unwind`.

// Linking the crate registers its runtime under the name "cuda".
extern crate tract_cuda;

use std::panic::{AssertUnwindSafe, catch_unwind};

use infl8_backend::export::panic_message;
use infl8_backend::{BackendError, Precision};
use tract_onnx::prelude::{
    DatumType, IntoTValue, TValue, TVec, Tensor, TractError, TractResult, TypedModel, tvec,
};
use tract_onnx::tract_core::floats::FloatPrecisionTranslator;
use tract_onnx::tract_core::runtime::{Runnable, Runtime, runtime_for_name};
use tract_onnx::tract_core::transform::ModelTransform;

/// The backend's name, as users pick it.
pub const BACKEND: &str = "tract-cuda";

/// The load option naming the GPU.
pub const KEY_DEVICE: &str = "device";

/// The CUDA runtime, or why it cannot run here (no driver, no GPU, a
/// library missing, a driver older than the CUDA API this build targets):
/// [`BackendError::Unavailable`], asked before anything looks at the model
/// so that a chain falls back.
pub fn runtime() -> Result<&'static dyn Runtime, BackendError> {
    let unavailable = |detail: String| BackendError::Unavailable(format!("{BACKEND}: {detail}"));
    match catch_unwind(|| runtime_for_name("cuda")) {
        Ok(Ok(Some(rt))) => Ok(rt),
        Ok(Ok(None)) => Err(unavailable(
            "tract's CUDA runtime is not linked into this build".into(),
        )),
        Ok(Err(e)) => Err(unavailable(format!("{e:#}"))),
        Err(payload) => Err(unavailable(panic_message(&*payload))),
    }
}

/// The GPU the options name: tract-cuda 0.23 drives GPU 0 of the process.
pub fn device(opts: &infl8_backend::LoadOptions) -> Result<u64, BackendError> {
    let Some(value) = opts.extra.get(KEY_DEVICE) else {
        return Ok(0);
    };
    let index = value
        .as_u64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
        .ok_or_else(|| {
            BackendError::InvalidArgument(format!(
                "{KEY_DEVICE}: expected a GPU index (0, 1, ...), got {value}"
            ))
        })?;
    if index != 0 {
        return Err(BackendError::InvalidArgument(format!(
            "{KEY_DEVICE}: {BACKEND} runs on the first visible GPU only (tract-cuda 0.23); \
             choose the GPU with CUDA_VISIBLE_DEVICES={index} and device 0"
        )));
    }
    Ok(index)
}

/// A model prepared for the GPU.
pub struct GpuPlan {
    runnable: Box<dyn Runnable>,
    /// The model was converted to fp16: inputs go in as fp16.
    fp16: bool,
}

impl std::fmt::Debug for GpuPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuPlan").field("fp16", &self.fp16).finish()
    }
}

/// Prepares `model` (typed, not yet optimised for the CPU: tract-cuda
/// matches the core ops) for the GPU on `rt` ([`runtime`]), in fp16 when
/// asked.
pub fn prepare(
    rt: &'static dyn Runtime,
    model: TypedModel,
    precision: Precision,
) -> Result<GpuPlan, String> {
    let fp16 = precision == Precision::Fp16;
    let prepared = catch_unwind(AssertUnwindSafe(|| -> TractResult<Box<dyn Runnable>> {
        let mut model = model.into_decluttered()?;
        if fp16 {
            FloatPrecisionTranslator::new(DatumType::F32, DatumType::F16).transform(&mut model)?;
        }
        rt.prepare(model)
    }));
    let runnable = match prepared {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(format!("tract-cuda cannot prepare the model: {e:#}")),
        Err(payload) => {
            return Err(format!(
                "tract-cuda failed while starting CUDA: {}",
                panic_message(&*payload)
            ));
        }
    };
    Ok(GpuPlan { runnable, fp16 })
}

impl GpuPlan {
    /// One invocation on the GPU. A panic in tract-cuda (its per-thread
    /// CUDA handles are created with `expect`) becomes an error.
    pub fn run(&self, input: Tensor) -> TractResult<TVec<TValue>> {
        let input = if self.fp16 {
            input.cast_to_dt(DatumType::F16)?.into_owned()
        } else {
            input
        };
        catch_unwind(AssertUnwindSafe(|| {
            self.runnable.run(tvec![input.into_tvalue()])
        }))
        .unwrap_or_else(|payload| {
            Err(TractError::msg(format!(
                "tract-cuda panicked: {}",
                panic_message(&*payload)
            )))
        })
    }
}
