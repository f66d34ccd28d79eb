//! Writes what infl8's preprocessing feeds a model, before intensity
//! normalisation: the volume reoriented to RAS and resampled to a target
//! spacing, as float32 NIfTI with the new grid's affine. `scripts/compare-monai.sh`
//! compares it with MONAI's `Orientation("RAS")` + `Spacing(pixdim)`.
//!
//! `cargo run --example resample -- IN.nii.gz OUT.nii.gz SX SY SZ`

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use infl8_core::nifti_io::{DataType, ReadLimits, read_volume, write_volume};
use infl8_core::preprocess::{Normalization, PreprocessSpec, preprocess};

fn main() -> Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output, sx, sy, sz] = args.as_slice() else {
        bail!("usage: resample IN.nii[.gz] OUT.nii[.gz] SX SY SZ (target spacing in mm)");
    };
    let mut target = [0.0; 3];
    for (t, s) in target.iter_mut().zip([sx, sy, sz]) {
        *t = s
            .parse()
            .with_context(|| format!("target spacing {s:?} is not a number"))?;
    }
    let (input, output) = (PathBuf::from(input), PathBuf::from(output));
    let vol = read_volume(&input, &ReadLimits::default())?;
    let spec = PreprocessSpec {
        reorient: true,
        target_spacing: Some(target),
        normalization: Normalization::None,
    };
    let (out, _) = preprocess(&vol, &spec).with_context(|| input.display().to_string())?;
    write_volume(&output, &out, DataType::F32)?;
    println!(
        "{} -> {}: {:?} voxels of {:?} mm",
        input.display(),
        output.display(),
        out.dims(),
        out.spacing
    );
    Ok(ExitCode::SUCCESS)
}
