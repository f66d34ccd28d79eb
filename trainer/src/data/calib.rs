//! The cases a quantizer's `--calib` / `--eval` path stands for: one NIfTI
//! file, a labelled dataset (its cases, see [`open_dataset`]), or any other
//! folder (its NIfTI files, each with a `<id>_label` sibling when there).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use infl8_core::nifti_io::{PairRole, is_nifti, label_beside, nifti_stem, pair_part};
use infl8_quantize::Case;

use super::dataset::open_dataset;

/// The case id of a calibration file: `<id>` of `<id>_image.nii[.gz]`,
/// else the file's stem.
fn id_of(p: &Path) -> String {
    let name = p.file_name().unwrap_or_default();
    match pair_part(&name.to_string_lossy()) {
        Some((id, PairRole::Image)) => id.to_string(),
        _ => nifti_stem(name),
    }
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
            label: label_beside(path),
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
                    label: label_beside(&p),
                    image: p,
                })
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_calibration_folder_takes_nifti_names_in_any_case() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["scan.NII.GZ", "other.nii", ".hidden.nii", "notes.txt"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let cases = cases_of(dir.path()).unwrap();
        let ids: Vec<&str> = cases.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["other", "scan"]);

        std::fs::write(dir.path().join("c1_label.NII.GZ"), b"").unwrap();
        let one = cases_of(&dir.path().join("c1_IMAGE.NII.GZ"));
        assert!(one.is_err(), "a missing file is an error, not a case");
        std::fs::write(dir.path().join("c1_IMAGE.NII.GZ"), b"").unwrap();
        let one = cases_of(&dir.path().join("c1_IMAGE.NII.GZ")).unwrap();
        assert_eq!(one[0].id, "c1");
        assert_eq!(one[0].label, Some(dir.path().join("c1_label.NII.GZ")));
    }
}
