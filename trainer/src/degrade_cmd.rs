//! `infl8-train degrade`: write a degraded copy of a scan and its labels
//! (see `infl8_trainer::degrade` for what each kind does).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use infl8_core::nifti_io::{DataType, ReadLimits, read_volume, write_volume};
use infl8_trainer::degrade::{self, Pair};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Kind {
    /// Blur along --axis with FWHM --thickness, then sample every --thickness mm.
    ThickSlice,
    /// Multiply by a smooth bias field (--bias), then add Rician noise (--noise).
    BiasNoise,
    /// Drop the slices below --z-mm (or --above-bottom mm over the labels' lowest voxel).
    FovCut,
    /// Resample in world space to --spacing, axes turned by --rotate degrees.
    Resample,
    /// Store the same voxels in another axis order (--axes, --flip).
    Reorient,
}

#[derive(Args)]
pub struct DegradeArgs {
    #[arg(long, value_name = "IMG.nii[.gz]")]
    input: PathBuf,
    /// The label map on the image's grid (0 = background).
    #[arg(long, value_name = "LBL.nii[.gz]")]
    label: PathBuf,
    #[arg(long, value_enum)]
    kind: Kind,
    /// Seed of the bias field and noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// thick-slice: the voxel axis (0, 1, 2) the slices are thick along.
    #[arg(long, default_value_t = 2)]
    axis: usize,
    /// thick-slice: slice thickness and spacing in mm.
    #[arg(long, default_value_t = 5.0)]
    thickness: f64,
    /// bias-noise: field strength a, multiplier in [1/(1+a), 1+a] (0 = none).
    #[arg(long, default_value_t = 0.3)]
    bias: f64,
    /// bias-noise: Rician sigma as a fraction of the labelled foreground's
    /// median intensity (0 = none).
    #[arg(long, default_value_t = 0.03)]
    noise: f64,
    /// fov-cut: keep the slices at world z >= this (mm).
    #[arg(long, allow_hyphen_values = true, conflicts_with = "above_bottom")]
    z_mm: Option<f64>,
    /// fov-cut: keep the slices at z >= the labels' lowest voxel + this (mm).
    #[arg(long)]
    above_bottom: Option<f64>,
    /// resample: voxel size in mm.
    #[arg(long, value_delimiter = ',', default_values_t = [1.3, 1.3, 1.3])]
    spacing: Vec<f64>,
    /// resample: rotation of the grid's axes about world x, y, z in degrees.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true, default_values_t = [0.0, 0.0, 0.0])]
    rotate: Vec<f64>,
    /// reorient: new axis a is old axis axes[a].
    #[arg(long, value_delimiter = ',', default_values_t = [0, 1, 2])]
    axes: Vec<usize>,
    /// reorient: the new axes to reverse.
    #[arg(long, value_delimiter = ',')]
    flip: Vec<usize>,
    #[arg(long, value_name = "OUT.nii.gz")]
    out_image: PathBuf,
    #[arg(long, value_name = "OUT.nii.gz")]
    out_label: PathBuf,
}

fn read(path: &Path) -> Result<infl8_core::Volume> {
    read_volume(path, &ReadLimits::default())
        .with_context(|| format!("cannot read {}", path.display()))
}

fn three<T: Copy>(v: &[T], what: &str) -> Result<[T; 3]> {
    match v {
        [a, b, c] => Ok([*a, *b, *c]),
        _ => bail!("{what} takes 3 comma-separated values, got {}", v.len()),
    }
}

pub fn run(a: DegradeArgs) -> Result<()> {
    let pair = Pair::new(read(&a.input)?, read(&a.label)?)
        .with_context(|| format!("{} and {}", a.input.display(), a.label.display()))?;
    let out = match a.kind {
        Kind::ThickSlice => degrade::thick_slices(&pair, a.axis, a.thickness),
        Kind::BiasNoise => degrade::bias_noise(&pair, a.bias, a.noise, a.seed),
        Kind::FovCut => {
            let z = match (a.z_mm, a.above_bottom) {
                (Some(z), _) => z,
                (None, Some(dz)) => degrade::foreground_bottom_z(&pair)? + dz,
                (None, None) => bail!("fov-cut needs --z-mm or --above-bottom"),
            };
            degrade::fov_cut(&pair, z)
        }
        Kind::Resample => {
            let (affine, dims) = degrade::rotated_grid(
                &pair.image,
                three(&a.spacing, "--spacing")?,
                three(&a.rotate, "--rotate")?,
            )?;
            degrade::resample(&pair, affine, dims)
        }
        Kind::Reorient => {
            let mut flip = [false; 3];
            for &f in &a.flip {
                *flip
                    .get_mut(f)
                    .with_context(|| format!("--flip {f}: axes are 0, 1, 2"))? = true;
            }
            degrade::reorient(&pair, three(&a.axes, "--axes")?, flip)
        }
    }
    .with_context(|| format!("cannot degrade {}", a.input.display()))?;
    write_volume(&a.out_image, &out.image, DataType::F32)
        .with_context(|| format!("cannot write {}", a.out_image.display()))?;
    write_volume(&a.out_label, &out.label, DataType::U8)
        .with_context(|| format!("cannot write {}", a.out_label.display()))?;
    let d = out.image.dims();
    let s = out.image.spacing;
    println!(
        "{}: {}x{}x{} voxels of {:.3}x{:.3}x{:.3} mm",
        a.out_image.display(),
        d[0],
        d[1],
        d[2],
        s[0],
        s[1],
        s[2]
    );
    Ok(())
}
