//! The one NIfTI path convention: which file names are NIfTI images, their
//! stems, and the `<id>_image` / `<id>_label` pairing of datasets. Segment,
//! watch, the datasets and the quantizer's calibration folders all ask here,
//! so a file one of them takes is a file all of them take.
//!
//! Suffixes match in any ASCII case (scanner and PACS exports write
//! `SCAN.NII.GZ`); dotfiles are never inputs (editors, sync tools and our
//! own temporary files start their names with a dot).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// The extensions of single-file NIfTI, longest first so `.nii.gz` wins.
const EXTENSIONS: [&str; 2] = [".nii.gz", ".nii"];

/// Which half of a dataset pair a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairRole {
    Image,
    Label,
}

/// `name` without an ASCII `suffix` matched in any case.
fn strip_suffix_any_case<'a>(name: &'a str, suffix: &str) -> Option<&'a str> {
    let cut = name.len().checked_sub(suffix.len())?;
    // The suffix is ASCII, so where its bytes match, `cut` is a char boundary.
    name.as_bytes()[cut..]
        .eq_ignore_ascii_case(suffix.as_bytes())
        .then(|| &name[..cut])
}

/// `name` without its `.nii.gz` / `.nii` extension; `None` for other names.
pub fn strip_nifti_extension(name: &str) -> Option<&str> {
    EXTENSIONS
        .iter()
        .find_map(|ext| strip_suffix_any_case(name, ext))
}

/// Whether `path` names a NIfTI image: a `.nii` / `.nii.gz` name in any
/// case that is not a dotfile.
pub fn is_nifti(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    !name.starts_with('.') && strip_nifti_extension(&name).is_some()
}

/// `name.nii.gz` / `name.nii` -> `name` (other names unchanged).
pub fn nifti_stem(input_name: &OsStr) -> String {
    let name = input_name.to_string_lossy();
    strip_nifti_extension(&name).unwrap_or(&name).to_string()
}

/// `<id>_image.nii[.gz]` -> `(id, Image)`, `<id>_label.nii[.gz]` ->
/// `(id, Label)`; `None` for other names and dotfiles. The id may be empty,
/// which callers refuse in their own words.
pub fn pair_part(name: &str) -> Option<(&str, PairRole)> {
    if name.starts_with('.') {
        return None;
    }
    let stem = strip_nifti_extension(name)?;
    if let Some(id) = strip_suffix_any_case(stem, "_image") {
        Some((id, PairRole::Image))
    } else {
        strip_suffix_any_case(stem, "_label").map(|id| (id, PairRole::Label))
    }
}

/// `<id>_label` with the image's own extension, beside `<id>_image`, when
/// that file exists.
pub fn label_beside(image: &Path) -> Option<PathBuf> {
    let name = image.file_name()?.to_str()?;
    let (id, PairRole::Image) = pair_part(name)? else {
        return None;
    };
    let stem = strip_nifti_extension(name)?;
    let extension = &name[stem.len()..];
    let label = image.with_file_name(format!("{id}_label{extension}"));
    label.is_file().then_some(label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nifti_names_match_in_any_case_and_dotfiles_never() {
        for yes in ["a.nii", "a.nii.gz", "scan.NII.GZ", "Scan.Nii", "x.y.nii.Gz"] {
            assert!(is_nifti(Path::new(yes)), "{yes}");
        }
        for no in [
            ".a.nii",
            ".a.NII.GZ",
            ".nii",
            "a.gz",
            "a.nii.bak",
            "a.niigz",
            "nii",
        ] {
            assert!(!is_nifti(Path::new(no)), "{no}");
        }
        assert_eq!(nifti_stem(OsStr::new("scan.NII.GZ")), "scan");
        assert_eq!(nifti_stem(OsStr::new("scan.nii")), "scan");
        assert_eq!(nifti_stem(OsStr::new("scan.txt")), "scan.txt");
        assert_eq!(nifti_stem(OsStr::new("Müller.nii.gz")), "Müller");
    }

    #[test]
    fn pairs_follow_the_same_rule() {
        assert_eq!(pair_part("a_image.nii.gz"), Some(("a", PairRole::Image)));
        assert_eq!(pair_part("a_LABEL.NII"), Some(("a", PairRole::Label)));
        assert_eq!(pair_part("_image.nii"), Some(("", PairRole::Image)));
        assert_eq!(pair_part(".a_image.nii.gz"), None);
        assert_eq!(pair_part("a_image.txt"), None);
        assert_eq!(pair_part("a.nii.gz"), None);

        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("c1_IMAGE.NII.GZ");
        assert_eq!(label_beside(&image), None);
        std::fs::write(dir.path().join("c1_label.NII.GZ"), b"").unwrap();
        assert_eq!(
            label_beside(&image),
            Some(dir.path().join("c1_label.NII.GZ"))
        );
        assert_eq!(label_beside(&dir.path().join("c1_label.NII.GZ")), None);
    }
}
