//! `infl8-train score`: Dice, HD95 and volume error of a predicted mask
//! against a reference mask on the same grid, optionally with a PNG of
//! where they disagree.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use infl8_core::Volume;
use infl8_core::metrics::{hard_dice, hausdorff95_mm, volume_error};
use infl8_core::nifti_io::{ReadLimits, read_volume};
use infl8_core::preview::{PreviewOptions, write_preview_png};
use ndarray::{Array3, Axis, Zip};
use serde::Serialize;

/// Largest difference (mm) between two affines' entries that still counts
/// as one grid: NIfTI stores them as f32.
const AFFINE_TOLERANCE_MM: f64 = 1e-3;

#[derive(Args)]
pub struct ScoreArgs {
    /// The predicted mask (any nonzero voxel is foreground).
    #[arg(long, value_name = "PRED.nii[.gz]")]
    pred: PathBuf,
    /// The reference mask on the same grid (any nonzero voxel is foreground).
    #[arg(long, value_name = "REF.nii[.gz]")]
    reference: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Write a PNG of the agreement over this image (same grid):
    /// red = false positive, green = both, blue = missed.
    #[arg(long, value_name = "OUT.png", requires = "image")]
    overlay: Option<PathBuf>,
    /// The scan the masks belong to (for --overlay).
    #[arg(long, value_name = "IMG.nii[.gz]")]
    image: Option<PathBuf>,
}

#[derive(Serialize)]
struct Score {
    pred: PathBuf,
    reference: PathBuf,
    dice: Option<f64>,
    hd95_mm: Option<f64>,
    /// (|pred| - |ref|) / |ref|.
    volume_error: Option<f64>,
    pred_voxels: usize,
    reference_voxels: usize,
}

fn mask(path: &Path) -> Result<(Volume, Array3<bool>)> {
    let v = read_volume(path, &ReadLimits::default())
        .with_context(|| format!("cannot read {}", path.display()))?;
    if v.channels() != 1 {
        bail!(
            "{}: a mask has one channel, this has {}",
            path.display(),
            v.channels()
        );
    }
    let m = v.data.index_axis(Axis(0), 0).mapv(|x| x != 0.0);
    Ok((v, m))
}

fn same_grid(a: &Volume, b: &Volume, pa: &Path, pb: &Path) -> Result<()> {
    if a.dims() != b.dims() {
        bail!(
            "{} has dims {:?} but {} has {:?}: they must share a grid",
            pa.display(),
            a.dims(),
            pb.display(),
            b.dims()
        );
    }
    let diff = (a.affine - b.affine).abs().max();
    if diff > AFFINE_TOLERANCE_MM {
        bail!(
            "{} and {} have affines {diff:.4} mm apart: they must share a grid",
            pa.display(),
            pb.display()
        );
    }
    Ok(())
}

pub fn run(a: ScoreArgs) -> Result<()> {
    let (pv, pred) = mask(&a.pred)?;
    let (rv, truth) = mask(&a.reference)?;
    same_grid(&pv, &rv, &a.pred, &a.reference)?;
    let as_u8 = |m: &Array3<bool>| m.iter().map(|&v| u8::from(v)).collect::<Vec<_>>();
    let count = |m: &Array3<bool>| m.iter().filter(|&&v| v).count();
    let score = Score {
        dice: hard_dice(&as_u8(&pred), &as_u8(&truth), 1),
        hd95_mm: hausdorff95_mm(pred.view(), truth.view(), rv.spacing),
        volume_error: volume_error(pred.view(), truth.view()),
        pred_voxels: count(&pred),
        reference_voxels: count(&truth),
        pred: a.pred.clone(),
        reference: a.reference.clone(),
    };
    if let (Some(png), Some(img)) = (&a.overlay, &a.image) {
        let image = read_volume(img, &ReadLimits::default())
            .with_context(|| format!("cannot read {}", img.display()))?;
        same_grid(&image, &rv, img, &a.reference)?;
        // Labels 1, 2, 3 draw red, green, blue (infl8_core::preview palette).
        let mut agree = Array3::<u8>::zeros(truth.raw_dim());
        Zip::from(&mut agree)
            .and(&pred)
            .and(&truth)
            .for_each(|d, &p, &t| {
                *d = match (p, t) {
                    (true, false) => 1,
                    (true, true) => 2,
                    (false, true) => 3,
                    (false, false) => 0,
                }
            });
        // 1.5 mm pixels keep a whole head's figure small enough to commit.
        let opts = PreviewOptions {
            pixel_mm: Some(1.5),
            ..PreviewOptions::default()
        };
        write_preview_png(png, &image, agree.view(), &opts)
            .with_context(|| format!("cannot write {}", png.display()))?;
    }
    let fmt =
        |v: Option<f64>, scale: f64| v.map_or("undefined".into(), |x| format!("{:.4}", x * scale));
    if a.json {
        println!("{}", serde_json::to_string(&score)?);
    } else {
        println!(
            "dice {}  hd95 {} mm  volume error {} %  ({} vs {} voxels)",
            fmt(score.dice, 1.0),
            fmt(score.hd95_mm, 1.0),
            fmt(score.volume_error, 100.0),
            score.pred_voxels,
            score.reference_voxels
        );
    }
    Ok(())
}
