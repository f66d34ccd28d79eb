//! Checks of a model's declared input and output against the run, with
//! errors that name the model's shapes.

use super::InferenceError;
use crate::backend::{Dim, TensorInfo};

/// `[C, X, Y, Z]` of an image, every axis non-empty.
pub(crate) fn image_dims(shape: &[usize]) -> Result<(usize, [usize; 3]), InferenceError> {
    match *shape {
        [c, x, y, z] if c > 0 && x > 0 && y > 0 && z > 0 => Ok((c, [x, y, z])),
        _ => Err(InferenceError::Image(format!(
            "expected [channels, x, y, z] with no empty axis, got {shape:?}"
        ))),
    }
}

pub(crate) fn fmt_dims(dims: &[Dim]) -> String {
    let dims: Vec<String> = dims.iter().map(Dim::to_string).collect();
    format!("[{}]", dims.join(", "))
}

pub(crate) fn check_input(
    info: &TensorInfo,
    channels: usize,
    roi: [usize; 3],
) -> Result<(), InferenceError> {
    let err = |reason: String| InferenceError::ModelInput {
        model: info.to_string(),
        reason,
    };
    if info.rank() != 5 {
        return Err(err(format!(
            "sliding-window inference feeds [batch, channels, x, y, z] (rank 5), the model takes rank {}",
            info.rank()
        )));
    }
    if let Some(c) = info.shape[1].fixed().filter(|&c| c != channels) {
        return Err(err(format!(
            "the model expects {c} input channels, the image has {channels}"
        )));
    }
    let model_roi = &info.shape[2..];
    if model_roi
        .iter()
        .zip(&roi)
        .any(|(d, &r)| d.fixed().is_some_and(|n| n != r))
    {
        return Err(err(format!(
            "the model takes windows of {} voxels but roi is {roi:?}",
            fmt_dims(model_roi)
        )));
    }
    Ok(())
}

/// Checks the declared output against `[B, K, spatial...]`; returns K when fixed.
pub(crate) fn check_output_info(
    info: &TensorInfo,
    spatial: &[usize],
) -> Result<Option<usize>, InferenceError> {
    let err = |reason: String| InferenceError::ModelOutput {
        model: info.to_string(),
        reason,
    };
    if info.rank() != spatial.len() + 2 {
        return Err(err(format!(
            "expected rank {} [batch, classes, {}], the model declares rank {}",
            spatial.len() + 2,
            spatial
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            info.rank()
        )));
    }
    if info.shape[2..]
        .iter()
        .zip(spatial)
        .any(|(d, &s)| d.fixed().is_some_and(|n| n != s))
    {
        return Err(err(format!(
            "its windows are {} voxels but the input windows are {spatial:?}; \
             outputs at another resolution are not supported",
            fmt_dims(&info.shape[2..])
        )));
    }
    match info.shape[1].fixed() {
        Some(0) => Err(err("declares 0 output channels".into())),
        k => Ok(k),
    }
}

/// Checks a batch's actual output is `[sent, K, spatial...]`, K > 0; returns K.
pub(crate) fn output_classes(
    info: &TensorInfo,
    got: &[usize],
    sent: usize,
    spatial: &[usize],
) -> Result<usize, InferenceError> {
    let fits =
        got.len() == spatial.len() + 2 && got[0] == sent && got[1] > 0 && &got[2..] == spatial;
    if fits {
        Ok(got[1])
    } else {
        let want: Vec<String> = spatial.iter().map(usize::to_string).collect();
        Err(InferenceError::ModelOutput {
            model: info.to_string(),
            reason: format!(
                "for a batch of {sent} windows expected shape [{sent}, K, {}], got {got:?}",
                want.join(", ")
            ),
        })
    }
}
