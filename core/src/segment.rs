//! One volume, end to end: read, preprocess, infer, map back, write.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::{Array3, Array4, ArrayView3};

use crate::backend::Model;
use crate::budget::{self, BudgetError};
use crate::inference::{self, InferenceError, postprocess};
use crate::manifest::{InferenceMode, Manifest, Postprocessing};
use crate::nifti_io::{self, NiftiIoError, ReadLimits};
use crate::preprocess::{self, PreprocessError};
use crate::volume::Volume;

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error(transparent)]
    Nifti(#[from] NiftiIoError),
    #[error("{path}: {message}")]
    Input { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Budget {
        path: PathBuf,
        #[source]
        source: BudgetError,
    },
    #[error("{path}: preprocessing failed: {source}")]
    Preprocess {
        path: PathBuf,
        #[source]
        source: PreprocessError,
    },
    #[error("{path}: inference failed: {source}")]
    Inference {
        path: PathBuf,
        #[source]
        source: InferenceError,
    },
    /// The volume ran past `limits.timeout_s` ([`crate::engine::Engine`]).
    #[error(transparent)]
    TimedOut(#[from] crate::engine::TimedOut),
}

/// A model with its manifest and the runtime's post-processing choices.
pub struct Segmenter {
    pub model: Box<dyn Model>,
    pub manifest: Manifest,
    /// Windows or slabs per backend call.
    pub window_batch: usize,
    /// Clean-up applied to the label map (see [`Postprocess::effective`]).
    ///
    /// [`Postprocess::effective`]: crate::config::Postprocess::effective
    pub postprocess: Postprocessing,
}

/// Labels (and optionally logits) on the input's own grid.
pub struct Segmentation {
    /// `[X, Y, Z]`.
    pub labels: Array3<u8>,
    /// `[K, X, Y, Z]`, blended logits, when asked for.
    pub logits: Option<Array4<f32>>,
    /// Windows (or slab windows) the backend ran.
    pub windows: u64,
}

/// Timings and counts of one `segment_file` call.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SegmentReport {
    pub input: PathBuf,
    pub output: PathBuf,
    pub dims: [usize; 3],
    pub windows: u64,
    pub read_s: f64,
    pub infer_s: f64,
    pub write_s: f64,
    /// Voxels per label value.
    pub label_voxels: Vec<u64>,
    /// Peak resident memory of the process after this volume.
    pub peak_rss_bytes: Option<u64>,
    /// Why the volume failed (folder runs report failures too; the other
    /// fields are then empty and no output was written).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Segmenter {
    /// A segmenter that cleans up the label map as the manifest asks (a
    /// run from settings goes through [`crate::engine::open`], which also
    /// applies the settings' post-processing choices).
    pub fn new(model: Box<dyn Model>, manifest: Manifest, window_batch: usize) -> Segmenter {
        Segmenter {
            model,
            postprocess: manifest.postprocess,
            manifest,
            window_batch: window_batch.max(1),
        }
    }

    /// Segments a volume already in memory. `source` names it in errors.
    pub fn segment(
        &self,
        vol: &Volume,
        source: &Path,
        want_logits: bool,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<Segmentation, SegmentError> {
        let input_err = |message: String| SegmentError::Input {
            path: source.to_path_buf(),
            message,
        };
        if vol.channels() != self.manifest.input_channels {
            return Err(input_err(format!(
                "the volume has {} channel(s), the model takes {}",
                vol.channels(),
                self.manifest.input_channels
            )));
        }
        let (prepared, inverse) =
            preprocess::preprocess(vol, &self.manifest.preprocess).map_err(|source_err| {
                SegmentError::Preprocess {
                    path: source.to_path_buf(),
                    source: source_err,
                }
            })?;
        let infer_err = |e: InferenceError| SegmentError::Inference {
            path: source.to_path_buf(),
            source: e,
        };
        let counter = std::sync::atomic::AtomicU64::new(0);
        let count = |done: u64, total: u64| {
            counter.store(done, std::sync::atomic::Ordering::Relaxed);
            progress(done, total);
        };
        let logits = match &self.manifest.inference {
            InferenceMode::SlidingWindow(sw) => {
                let sw = inference::SlidingWindow {
                    batch_size: self.window_batch,
                    ..sw.clone()
                };
                sw.run(prepared.data.view(), self.model.as_ref(), &count)
            }
            InferenceMode::Slab(slab) => {
                let slab = inference::Slab {
                    batch_size: self.window_batch,
                    ..slab.clone()
                };
                slab.run(prepared.data.view(), self.model.as_ref(), &count)
            }
        }
        .map_err(infer_err)?;
        drop(prepared);
        if logits.shape()[0] != self.manifest.labels.len() {
            return Err(input_err(format!(
                "the model produced {} classes, its manifest names {}",
                logits.shape()[0],
                self.manifest.labels.len()
            )));
        }
        // Logits go back to the input grid before the argmax: resampling
        // class scores (trilinear) gives smoother borders than resampling
        // labels, and the saved logits then agree with the saved labels.
        let logits = inverse
            .logits(logits)
            .map_err(|e| SegmentError::Preprocess {
                path: source.to_path_buf(),
                source: e,
            })?;
        let mut labels = postprocess::argmax(logits.view()).map_err(infer_err)?;
        let n = self.manifest.labels.len();
        // Components first: a speck outside must not decide what is a hole.
        if self.postprocess.largest_component {
            postprocess::keep_largest_component_per_label(&mut labels, n);
        }
        if self.postprocess.fill_holes {
            postprocess::fill_holes_per_label(&mut labels, n);
        }
        Ok(Segmentation {
            labels,
            logits: want_logits.then_some(logits),
            windows: counter.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Reads `input`, segments it and writes `output` (uint8 labels on the
    /// input's grid) and, if asked, `logits` (float32, channel last). Either
    /// both outputs are complete or neither exists.
    pub fn segment_file(
        &self,
        input: &Path,
        output: &Path,
        logits: Option<&Path>,
        limits: &ReadLimits,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<SegmentReport, SegmentError> {
        self.segment_file_with(input, output, logits, limits, progress, |_, _| {})
    }

    /// [`Segmenter::segment_file`], then `written(input volume, labels)`
    /// once the outputs exist: further products (a preview) come from what
    /// is in memory instead of reading both files back.
    pub fn segment_file_with(
        &self,
        input: &Path,
        output: &Path,
        logits: Option<&Path>,
        limits: &ReadLimits,
        progress: &(dyn Fn(u64, u64) + Sync),
        written: impl FnOnce(&Volume, ArrayView3<u8>),
    ) -> Result<SegmentReport, SegmentError> {
        let t0 = Instant::now();
        let vol = nifti_io::read_volume(input, limits)?;
        let read_s = t0.elapsed().as_secs_f64();
        self.segment_volume_with(
            &vol, input, read_s, output, logits, limits, progress, written,
        )
    }

    /// [`Segmenter::segment_file_with`] for a volume already in memory
    /// (read from DICOM, say): `input` names it in messages and the
    /// report, `read_s` is what reading it took.
    #[allow(clippy::too_many_arguments)]
    pub fn segment_volume_with(
        &self,
        vol: &Volume,
        input: &Path,
        read_s: f64,
        output: &Path,
        logits: Option<&Path>,
        limits: &ReadLimits,
        progress: &(dyn Fn(u64, u64) + Sync),
        written: impl FnOnce(&Volume, ArrayView3<u8>),
    ) -> Result<SegmentReport, SegmentError> {
        budget::check(
            vol,
            &self.manifest,
            self.model.as_ref(),
            self.window_batch,
            limits.max_voxels,
            limits.memory_budget_bytes,
        )
        .map_err(|e| match e {
            BudgetError::Geometry(source) => SegmentError::Preprocess {
                path: input.to_path_buf(),
                source,
            },
            source => SegmentError::Budget {
                path: input.to_path_buf(),
                source,
            },
        })?;
        let t1 = Instant::now();
        let seg = self.segment(vol, input, logits.is_some(), progress)?;
        let infer_s = t1.elapsed().as_secs_f64();
        let t2 = Instant::now();
        nifti_io::write_labels(output, seg.labels.view(), vol)?;
        if let (Some(path), Some(l)) = (logits, &seg.logits)
            && let Err(e) = nifti_io::write_logits(path, l.view(), vol)
        {
            let _ = std::fs::remove_file(output);
            return Err(e.into());
        }
        let mut label_voxels = vec![0u64; self.manifest.labels.len()];
        for &l in seg.labels.iter() {
            if let Some(c) = label_voxels.get_mut(l as usize) {
                *c += 1;
            }
        }
        let write_s = t2.elapsed().as_secs_f64();
        written(vol, seg.labels.view());
        Ok(SegmentReport {
            input: input.to_path_buf(),
            output: output.to_path_buf(),
            dims: vol.dims(),
            windows: seg.windows,
            read_s,
            infer_s,
            write_s,
            label_voxels,
            peak_rss_bytes: peak_rss_bytes(),
            error: None,
        })
    }
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
