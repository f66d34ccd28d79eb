//! The settings' `limits` that need the model: the memory budget that caps
//! the window batch (and refuses a model whose one window does not fit),
//! and the per-volume timeout.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use infl8_backend::{BackendError, Model, Tensor, TensorInfo};
use tracing::{info, warn};

use super::EngineError;
use crate::config::Limits;
use crate::manifest::{InferenceMode, Manifest};

/// Bytes of one window's input and output tensors (f32), when the window's
/// size does not depend on the image.
pub fn window_bytes(manifest: &Manifest, model: &dyn Model) -> Option<u64> {
    let c = manifest.input_channels as u64;
    let k = manifest.labels.len().max(1) as u64;
    let spatial: u64 = match &manifest.inference {
        InferenceMode::SlidingWindow(sw) => {
            if sw.roi.contains(&0) {
                return None;
            }
            // Saturating: a declared window of 1e7 voxels a side must read
            // as "too large", not wrap round to a small number.
            sw.roi.iter().fold(1u64, |a, &r| a.saturating_mul(r as u64))
        }
        InferenceMode::Slab(s) => {
            // The in-plane size: roi_xy, else the model's fixed trailing dims.
            let shape = &model.input().shape;
            let fixed = |back: usize| shape.len().checked_sub(back).and_then(|i| shape[i].fixed());
            let xy = match s.roi_xy {
                Some([x, y]) if x > 0 && y > 0 => [x, y],
                _ => [fixed(2)?, fixed(1)?],
            };
            let plane = (xy[0] as u64).saturating_mul(xy[1] as u64);
            // Input: C x depth slices; output: K classes of the middle one;
            // plus one importance map of the plane.
            let per = (c.saturating_mul(s.depth as u64) + k + 1).saturating_mul(plane);
            return Some(per.saturating_mul(4));
        }
    };
    // Input and output tensors, plus the window's share of the importance
    // map (one map for all windows, so this overstates it for a batch).
    Some(spatial.saturating_mul(c + k + 1).saturating_mul(4))
}

/// Refuses a model whose declared fixed input (one window) does not fit
/// `limits.memory_budget_mb`, before any backend loads it: tract plans its
/// buffers for the declared size while it loads, and would abort on an
/// input declared `[1, 1, 1e5, 1e5, 1e5]` before [`window_batch`] could
/// look. A file that cannot be read is left to the backend to report.
pub fn check_declared_input(limits: &Limits, model_path: &Path) -> Result<(), EngineError> {
    use infl8_onnx::DeclaredDim;
    let budget = limits.memory_budget_mb.saturating_mul(1 << 20);
    if budget == 0 {
        return Ok(());
    }
    let Ok(model) = infl8_onnx::read_model(model_path) else {
        return Ok(());
    };
    for input in infl8_onnx::inputs(&model) {
        // The batch dimension aside: one window's input.
        let window = input.shape.as_deref().and_then(|dims| {
            dims.iter().skip(1).try_fold(4u64, |bytes, d| match d {
                DeclaredDim::Fixed(n) if *n > 0 => Some(bytes.saturating_mul(*n as u64)),
                _ => None,
            })
        });
        if let Some(bytes) = window.filter(|&b| b > budget) {
            return Err(EngineError::OverBudget(format!(
                "{}: limits.memory_budget_mb = {} MiB cannot hold one window of the model's \
                 declared input {} ({} MiB); refused before loading it",
                model_path.display(),
                limits.memory_budget_mb,
                input.name,
                bytes.div_ceil(1 << 20)
            )));
        }
    }
    Ok(())
}

/// The window batch to run with: `settings.window_batch`, capped so one
/// batch's tensors fit `limits.memory_budget_mb`. Fails when not even one
/// window fits, or the model's fixed batch does not.
pub fn window_batch(
    requested: usize,
    limits: &Limits,
    manifest: &Manifest,
    model: &dyn Model,
) -> Result<usize, EngineError> {
    if limits.memory_budget_mb == 0 {
        return Ok(requested);
    }
    let budget = limits.memory_budget_mb.saturating_mul(1 << 20);
    let Some(per_window) = window_bytes(manifest, model) else {
        warn!(
            memory_budget_mb = limits.memory_budget_mb,
            "the model's window size follows the image; limits.memory_budget_mb cannot size \
             the batch ahead of the volume and is not applied"
        );
        return Ok(requested);
    };
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let fits = budget / per_window.max(1);
    if fits == 0 {
        return Err(EngineError::OverBudget(format!(
            "limits.memory_budget_mb = {} MiB cannot hold one window (model.roi, or the \
             model's declared input size): its tensors need {:.1} MiB",
            limits.memory_budget_mb,
            mib(per_window)
        )));
    }
    if let Some(fixed) = model.input().shape.first().and_then(|d| d.fixed())
        && fixed as u64 > fits
    {
        return Err(EngineError::OverBudget(format!(
            "limits.memory_budget_mb = {} MiB holds {fits} window(s) but the model's batch is \
             fixed at {fixed} ({:.1} MiB)",
            limits.memory_budget_mb,
            mib(per_window * fixed as u64)
        )));
    }
    let batch = requested.min(usize::try_from(fits).unwrap_or(usize::MAX));
    info!(
        requested,
        effective = batch,
        window_mib = format!("{:.2}", mib(per_window)),
        memory_budget_mb = limits.memory_budget_mb,
        "window batch sized by the memory budget"
    );
    Ok(batch)
}

/// When the current volume must be finished by; shared between the model
/// wrapper and the command that starts each volume.
#[derive(Clone, Default)]
pub struct Deadline {
    limit: Option<Duration>,
    until: Arc<Mutex<Option<Instant>>>,
}

impl Deadline {
    /// `limit`: `limits.timeout_s` ([`Limits::timeout`]).
    pub fn new(limit: Option<Duration>) -> Self {
        Deadline {
            limit,
            until: Arc::default(),
        }
    }

    /// Starts the clock for a new volume.
    pub fn start(&self) {
        if let Some(limit) = self.limit
            && let Ok(mut u) = self.until.lock()
        {
            *u = Some(Instant::now() + limit);
        }
    }

    pub fn expired(&self) -> bool {
        self.until
            .lock()
            .ok()
            .and_then(|u| *u)
            .is_some_and(|u| Instant::now() >= u)
    }

    /// The error for `input`, which ran out of time.
    pub fn error(&self, input: &Path) -> TimedOut {
        TimedOut {
            path: input.to_path_buf(),
            limit_s: self.limit.map_or(0.0, |l| l.as_secs_f64()),
        }
    }
}

/// A volume that took longer than `limits.timeout_s`.
#[derive(Debug, thiserror::Error)]
#[error("{}: timed out: the volume took longer than limits.timeout_s = {limit_s} s", .path.display())]
pub struct TimedOut {
    pub path: std::path::PathBuf,
    pub limit_s: f64,
}

/// A model that refuses to start another batch once the volume's deadline
/// has passed: the timeout is checked between backend calls, so a volume
/// stops within one batch of it (a call that hangs is only stopped by the
/// parent of a worker process: `infl8 watch`, `infl8 segment --isolation`).
pub struct DeadlineModel {
    inner: Box<dyn Model>,
    deadline: Deadline,
}

impl DeadlineModel {
    pub fn wrap(inner: Box<dyn Model>, deadline: &Deadline) -> Box<dyn Model> {
        if deadline.limit.is_none() {
            return inner;
        }
        Box::new(DeadlineModel {
            inner,
            deadline: deadline.clone(),
        })
    }
}

impl Model for DeadlineModel {
    fn input(&self) -> &TensorInfo {
        self.inner.input()
    }

    fn output(&self) -> &TensorInfo {
        self.inner.output()
    }

    fn run(&self, data: &[f32], shape: &[usize]) -> Result<Tensor, BackendError> {
        if self.deadline.expired() {
            return Err(BackendError::Run("limits.timeout_s reached".into()));
        }
        self.inner.run(data, shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infl8_backend::Dim;

    struct Fake(TensorInfo, TensorInfo);

    impl Model for Fake {
        fn input(&self) -> &TensorInfo {
            &self.0
        }
        fn output(&self) -> &TensorInfo {
            &self.1
        }
        fn run(&self, data: &[f32], shape: &[usize]) -> Result<Tensor, BackendError> {
            Tensor::from_vec(shape.to_vec(), data.to_vec())
        }
    }

    fn fake(batch: Dim) -> Fake {
        let info = |name: &str, c| TensorInfo {
            name: name.into(),
            shape: vec![
                batch.clone(),
                Dim::Fixed(c),
                Dim::Fixed(16),
                Dim::Fixed(16),
                Dim::Fixed(16),
            ],
        };
        Fake(info("x", 1), info("y", 2))
    }

    fn limits(mb: u64) -> Limits {
        Limits {
            memory_budget_mb: mb,
            ..Limits::default()
        }
    }

    #[test]
    fn the_budget_caps_the_batch_and_refuses_when_one_window_does_not_fit() {
        // The example manifest: 1 channel in, 2 labels out.
        let m = crate::example::manifest([64, 64, 64]);
        let model = fake(Dim::Symbolic("N".into()));
        let per = window_bytes(&m, &model).unwrap();
        assert_eq!(per, 4 * 64 * 64 * 64 * 4);
        assert_eq!(window_batch(8, &limits(0), &m, &model).unwrap(), 8);
        // 4 MiB per window: 10 MiB hold 2.
        assert_eq!(window_batch(8, &limits(10), &m, &model).unwrap(), 2);
        assert_eq!(window_batch(2, &limits(10), &m, &model).unwrap(), 2);
        let e = window_batch(8, &limits(2), &m, &model)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("limits.memory_budget_mb") && e.contains("one window"),
            "{e}"
        );
        let fixed = fake(Dim::Fixed(4));
        let e = window_batch(8, &limits(10), &m, &fixed)
            .unwrap_err()
            .to_string();
        assert!(e.contains("fixed at 4"), "{e}");
        // Issue 21: a manifest roi of 100000 (or a model declaring
        // [1, 1, 1e5, 1e5, 1e5]) under the default budget is refused at
        // once, and a window too large for u64 does not wrap round.
        for roi in [100_000, usize::MAX / 2] {
            let huge = crate::example::manifest([roi; 3]);
            let e = window_batch(4, &Limits::default(), &huge, &model)
                .unwrap_err()
                .to_string();
            assert!(e.contains("model.roi") && e.contains("one window"), "{e}");
        }
    }

    #[test]
    fn a_model_declaring_a_huge_window_is_refused_before_loading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.onnx");
        let huge = infl8_onnx::examples::head_mask_model([100_000; 3], 0.1, 1.0);
        infl8_onnx::write_model(&huge, &path).unwrap();
        let e = check_declared_input(&Limits::default(), &path)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("limits.memory_budget_mb")
                && e.contains("one window")
                && e.contains("huge.onnx"),
            "{e}"
        );
        // A 64^3 window fits; no budget checks nothing.
        let small = infl8_onnx::examples::head_mask_model([64; 3], 0.1, 1.0);
        infl8_onnx::write_model(&small, &path).unwrap();
        check_declared_input(&Limits::default(), &path).unwrap();
        let huge_ok = infl8_onnx::examples::head_mask_model([100_000; 3], 0.1, 1.0);
        infl8_onnx::write_model(&huge_ok, &path).unwrap();
        check_declared_input(&limits(0), &path).unwrap();
    }

    #[test]
    fn an_expired_deadline_stops_the_next_batch() {
        let d = Deadline::new(Some(Duration::from_nanos(1)));
        let model = DeadlineModel::wrap(Box::new(fake(Dim::Fixed(1))), &d);
        // Not started: no deadline yet.
        assert!(model.run(&[0.0; 4], &[4]).is_ok());
        d.start();
        std::thread::sleep(Duration::from_millis(2));
        let e = model.run(&[0.0; 4], &[4]).unwrap_err().to_string();
        assert!(e.contains("limits.timeout_s"), "{e}");
        let e = d.error(std::path::Path::new("in.nii")).to_string();
        assert!(
            e.contains("in.nii") && e.contains("limits.timeout_s"),
            "{e}"
        );
        // No limit: the model is not wrapped at all.
        let none = Deadline::new(None);
        none.start();
        assert!(!none.expired());
    }
}
