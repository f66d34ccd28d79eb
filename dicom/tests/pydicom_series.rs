//! infl8-dicom on real DICOM series nobody here wrote: the pcir.org image
//! sets PyPI's pydicom ships (scripts/fetch-dicom-data.sh puts them under
//! .cache/dicom-data/), and damaged copies of them.

use std::path::{Path, PathBuf};

use infl8_core::volume::spacing_of;
use infl8_dicom::{DicomError, choose_series, read_series, scan_folder};
use nalgebra::Vector4;

fn sets() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.cache/dicom-data/pydicom-3.0.2/pydicom/data/test_files/dicomdirtests");
    assert!(
        dir.is_dir(),
        "{} is missing: run scripts/fetch-dicom-data.sh",
        dir.display()
    );
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn a_real_ct_series_becomes_a_volume_sorted_along_the_normal() {
    let dir = sets().join("98892001/CT5N");
    let all = scan_folder(&dir).unwrap();
    assert_eq!(all.len(), 1);
    let series = choose_series(&all, None, &dir).unwrap();
    assert_eq!(series.files.len(), 5);
    assert_eq!(series.modality, "CT");
    let vol = read_series(series).unwrap();
    assert_eq!(vol.dims(), [16, 16, 5]);
    let sp = spacing_of(&vol.affine);
    assert!(
        (sp[0] - 0.488281).abs() < 1e-5 && (sp[1] - 0.488281).abs() < 1e-5,
        "{sp:?}"
    );
    assert!((sp[2] - 2.5).abs() < 1e-6, "{sp:?}");
    // Slices go up the normal: the positions (z from -1.2375 to 8.7625 mm
    // in the headers) come out in order, whatever the file names say.
    let z = |k: f64| (vol.affine * Vector4::new(0.0, 0.0, k, 1.0)).z;
    assert!(
        (z(0.0) + 1.2375).abs() < 1e-4 && (z(4.0) - 8.7625).abs() < 1e-4,
        "{}",
        vol.affine
    );
    // Stored values are rescaled to Hounsfield units (intercept -1024).
    let min = vol.data.iter().copied().fold(f32::INFINITY, f32::min);
    let max = vol.data.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    assert!((-1100.0..0.0).contains(&min) && max > 0.0, "{min} {max}");
}

#[test]
fn real_series_that_are_not_one_volume_are_refused() {
    let sets = sets();
    let uneven = scan_folder(&sets.join("77654033/CT2")).unwrap();
    let e = read_series(&uneven[0]).unwrap_err().to_string();
    assert!(e.contains("uneven slice spacing"), "{e}");

    let mixed = scan_folder(&sets.join("98892003/MR700")).unwrap();
    let e = read_series(&mixed[0]).unwrap_err().to_string();
    assert!(e.contains("mixed orientations"), "{e}");
}

#[test]
fn damaged_and_repeated_files_are_named() {
    let src = sets().join("98892001/CT5N");
    let dir = tempfile::tempdir().unwrap();

    // A slice cut short: its header still reads, its pixels do not.
    let cut = dir.path().join("cut");
    copy_dir(&src, &cut);
    let victim = cut.join("2693");
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() - 300]).unwrap();
    let all = scan_folder(&cut).unwrap();
    let e = read_series(&all[0]).unwrap_err();
    assert!(matches!(e, DicomError::Read { .. }), "{e}");
    assert!(e.to_string().contains("2693"), "{e}");

    // The same slice twice under two names: one position, two files.
    let dup = dir.path().join("dup");
    copy_dir(&src, &dup);
    std::fs::copy(src.join("3023"), dup.join("3023-copy")).unwrap();
    let all = scan_folder(&dup).unwrap();
    let e = read_series(&all[0]).unwrap_err().to_string();
    assert!(e.contains("same position") && e.contains("3023"), "{e}");

    // Not DICOM at all, or empty: no series.
    let junk = dir.path().join("junk");
    std::fs::create_dir_all(&junk).unwrap();
    std::fs::write(junk.join("notes.txt"), "not an image").unwrap();
    let e = scan_folder(&junk).unwrap_err();
    assert!(matches!(e, DicomError::NoSeries(_)), "{e}");

    // A series asked for by a UID the folder lacks.
    let all = scan_folder(&src).unwrap();
    let e = choose_series(&all, Some("1.2.3"), &src)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1.2.3") && e.contains(&all[0].uid), "{e}");
}
