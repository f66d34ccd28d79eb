//! The cases a quantizer's `--calib` / `--eval` path stands for: one NIfTI
//! file, a labelled dataset (its cases, see [`open_dataset`]), or any other
//! folder (its NIfTI files, each with a `<id>_label` sibling when there).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use infl8_quantize::Case;

use super::dataset::open_dataset;

fn is_nifti(p: &Path) -> bool {
    let n = p
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    !n.starts_with('.') && (n.ends_with(".nii") || n.ends_with(".nii.gz"))
}

fn id_of(p: &Path) -> String {
    let n = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = n.strip_suffix(".gz").unwrap_or(&n);
    let n = n.strip_suffix(".nii").unwrap_or(n);
    n.strip_suffix("_image").unwrap_or(n).to_string()
}

/// `<id>_label.nii[.gz]` beside `<id>_image.nii[.gz]`, if there.
fn sibling_label(image: &Path) -> Option<PathBuf> {
    let name = image.file_name()?.to_str()?;
    for (img, lab) in [
        ("_image.nii.gz", "_label.nii.gz"),
        ("_image.nii", "_label.nii"),
    ] {
        if let Some(stem) = name.strip_suffix(img) {
            let p = image.with_file_name(format!("{stem}{lab}"));
            return p.is_file().then_some(p);
        }
    }
    None
}

/// The cases a --calib / --eval path stands for.
pub fn cases_of(path: &Path) -> Result<Vec<Case>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_file() {
        if !is_nifti(path) {
            bail!("{}: not a NIfTI file (.nii or .nii.gz)", path.display());
        }
        return Ok(vec![Case {
            id: id_of(path),
            image: path.to_path_buf(),
            label: sibling_label(path),
        }]);
    }
    match open_dataset(path) {
        Ok(ds) => Ok(ds
            .cases()
            .iter()
            .map(|c| Case {
                id: c.id.clone(),
                image: c.image.clone(),
                label: Some(c.label.clone()),
            })
            .collect()),
        Err(e) => {
            tracing::debug!(
                "{}: not a labelled dataset ({e}); using its NIfTI files",
                path.display()
            );
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("cannot list {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_nifti(p))
                .collect();
            files.sort();
            if files.is_empty() {
                bail!(
                    "{}: no .nii or .nii.gz files in this folder",
                    path.display()
                );
            }
            Ok(files
                .into_iter()
                .map(|p| Case {
                    id: id_of(&p),
                    label: sibling_label(&p),
                    image: p,
                })
                .collect())
        }
    }
}
