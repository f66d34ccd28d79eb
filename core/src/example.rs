//! The built-in example model (`infl8 example-model`): a small real ONNX
//! network that tells head from background in T1 MRI, with its manifest.
//! The tests and demos run the whole chain with it, no trained weights
//! needed.

use std::path::Path;

use crate::inference::{BlendMode, SlidingWindow};
use crate::manifest::{self, InferenceMode, Manifest};
use crate::preprocess::{Normalization, PreprocessSpec};

/// The example model's manifest: T1 MRI, percentile window, 2 mm grid,
/// sliding windows of `roi`.
pub fn manifest(roi: [usize; 3]) -> Manifest {
    Manifest {
        format: manifest::MANIFEST_FORMAT,
        name: Some("infl8-example-head-mask".into()),
        input_channels: 1,
        labels: vec!["background".into(), "head".into()],
        inference: InferenceMode::SlidingWindow(SlidingWindow {
            roi,
            overlap: 0.25,
            mode: BlendMode::Gaussian,
            ..SlidingWindow::default()
        }),
        preprocess: PreprocessSpec {
            reorient: true,
            target_spacing: Some([2.0, 2.0, 2.0]),
            normalization: Normalization::Percentile { lo: 1.0, hi: 99.0 },
        },
        postprocess: Default::default(),
    }
}

/// Writes the example model with a `roi` window and its manifest to `out`.
pub fn write_model(out: &Path, roi: [usize; 3]) -> Result<(), infl8_onnx::OnnxError> {
    let mut model = infl8_onnx::examples::head_mask_model(
        [roi[0] as i64, roi[1] as i64, roi[2] as i64],
        0.12,
        20.0,
    );
    infl8_onnx::set_metadata(
        &mut model,
        infl8_onnx::MANIFEST_KEY,
        &manifest(roi).to_json(),
    );
    infl8_onnx::write_model(&model, out)
}
