//! DICOM input for infl8: the image series in a folder, grouped by
//! SeriesInstanceUID ([`scan_folder`]), and one series read into a
//! [`Volume`] with its RAS affine ([`read_series`]), ready for the same
//! preprocessing as a NIfTI volume.
//!
//! Geometry follows the standard (PS3.3 C.7.6.2): a pixel's position is
//! ImagePositionPatient plus column index × column spacing along the row
//! direction plus row index × row spacing along the column direction (both
//! from ImageOrientationPatient). Slices are sorted by their position
//! projected on the slice normal (row × column direction), never by file
//! name or InstanceNumber, and the third axis of the affine is the step
//! between consecutive positions. DICOM's patient axes are LPS; the affine
//! is RAS, as NIfTI's, so the first two rows are negated.
//!
//! A series is refused, with the files and the reason, when its slices
//! disagree on orientation or grid, repeat a position, are unevenly spaced
//! (a missing slice), step off the normal (gantry tilt), or when an object
//! is multi-frame or its pixel data cannot be decoded. Stored values are
//! rescaled (RescaleSlope/Intercept) to f32.

mod geometry;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;
use ndarray::Array4;

use infl8_core::volume::Volume;

pub use geometry::{Geometry, GeometryError, SliceGeometry};

/// Why a folder or a series cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum DicomError {
    #[error("{}: {detail}", .path.display())]
    Read { path: PathBuf, detail: String },
    #[error("{}: {detail}", .path.display())]
    Attribute { path: PathBuf, detail: String },
    #[error("series {series}: {detail}")]
    Series { series: String, detail: String },
    #[error("{}: no DICOM image series found", .0.display())]
    NoSeries(PathBuf),
}

/// One series of a folder: its files and what identifies it.
#[derive(Clone, Debug, PartialEq)]
pub struct SeriesInfo {
    pub uid: String,
    pub modality: String,
    pub description: String,
    pub files: Vec<PathBuf>,
}

/// Reads only the attributes before the pixel data.
fn open_header(path: &Path) -> Result<DefaultDicomObject, DicomError> {
    OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .map_err(|e| DicomError::Read {
            path: path.to_path_buf(),
            detail: format!("not a readable DICOM file: {e}"),
        })
}

fn text(obj: &DefaultDicomObject, tag: dicom_core::Tag) -> Option<String> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim().trim_end_matches('\0').to_string())
}

/// The image series under `dir` (not recursive), grouped by
/// SeriesInstanceUID and sorted by it. Files that are not DICOM, or hold no
/// image (no Rows), are skipped with a debug line: scanners leave DICOMDIR
/// and other files beside the images.
pub fn scan_folder(dir: &Path) -> Result<Vec<SeriesInfo>, DicomError> {
    let entries = std::fs::read_dir(dir).map_err(|e| DicomError::Read {
        path: dir.to_path_buf(),
        detail: format!("cannot list the folder: {e}"),
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    let mut series: BTreeMap<String, SeriesInfo> = BTreeMap::new();
    for path in paths {
        let obj = match open_header(&path) {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!("{e}");
                continue;
            }
        };
        if obj.element_opt(tags::ROWS).ok().flatten().is_none() {
            tracing::debug!(path = %path.display(), "no image (no Rows): skipped");
            continue;
        }
        let Some(uid) = text(&obj, tags::SERIES_INSTANCE_UID) else {
            tracing::debug!(path = %path.display(), "no SeriesInstanceUID: skipped");
            continue;
        };
        let entry = series.entry(uid.clone()).or_insert_with(|| SeriesInfo {
            uid,
            modality: text(&obj, tags::MODALITY).unwrap_or_default(),
            description: text(&obj, tags::SERIES_DESCRIPTION).unwrap_or_default(),
            files: Vec::new(),
        });
        entry.files.push(path);
    }
    if series.is_empty() {
        return Err(DicomError::NoSeries(dir.to_path_buf()));
    }
    Ok(series.into_values().collect())
}

/// The series named `uid`, or the only one, or the one with the most
/// files (logged, with the others).
pub fn choose_series<'a>(
    all: &'a [SeriesInfo],
    uid: Option<&str>,
    dir: &Path,
) -> Result<&'a SeriesInfo, DicomError> {
    if let Some(uid) = uid {
        return all.iter().find(|s| s.uid == uid).ok_or_else(|| {
            let known: Vec<&str> = all.iter().map(|s| s.uid.as_str()).collect();
            DicomError::Series {
                series: uid.to_string(),
                detail: format!("not in {} (it holds {})", dir.display(), known.join(", ")),
            }
        });
    }
    let chosen = all
        .iter()
        .max_by_key(|s| s.files.len())
        .ok_or_else(|| DicomError::NoSeries(dir.to_path_buf()))?;
    if all.len() > 1 {
        tracing::info!(
            series = %chosen.uid,
            files = chosen.files.len(),
            others = all.len() - 1,
            "{} holds {} series; using the largest",
            dir.display(),
            all.len()
        );
    }
    Ok(chosen)
}

fn attribute_err(path: &Path, what: &str, e: impl std::fmt::Display) -> DicomError {
    DicomError::Attribute {
        path: path.to_path_buf(),
        detail: format!("{what}: {e}"),
    }
}

fn floats(
    obj: &DefaultDicomObject,
    path: &Path,
    tag: dicom_core::Tag,
    name: &str,
    n: usize,
) -> Result<Vec<f64>, DicomError> {
    let v = obj
        .element(tag)
        .map_err(|e| attribute_err(path, name, e))?
        .to_multi_float64()
        .map_err(|e| attribute_err(path, name, e))?;
    if v.len() != n || v.iter().any(|x| !x.is_finite()) {
        return Err(attribute_err(
            path,
            name,
            format!("expected {n} finite numbers, got {v:?}"),
        ));
    }
    Ok(v)
}

fn int(
    obj: &DefaultDicomObject,
    path: &Path,
    tag: dicom_core::Tag,
    name: &str,
) -> Result<i64, DicomError> {
    obj.element(tag)
        .map_err(|e| attribute_err(path, name, e))?
        .to_int::<i64>()
        .map_err(|e| attribute_err(path, name, e))
}

/// One slice's geometry from its header.
fn slice_geometry(obj: &DefaultDicomObject, path: &Path) -> Result<SliceGeometry, DicomError> {
    if let Some(frames) = obj.element_opt(tags::NUMBER_OF_FRAMES).ok().flatten() {
        let n = frames.to_int::<i64>().unwrap_or(1);
        if n > 1 {
            return Err(attribute_err(
                path,
                "NumberOfFrames",
                format!(
                    "{n} frames: multi-frame objects are not supported (single-frame slices only)"
                ),
            ));
        }
    }
    let ipp = floats(
        obj,
        path,
        tags::IMAGE_POSITION_PATIENT,
        "ImagePositionPatient",
        3,
    )?;
    let iop = floats(
        obj,
        path,
        tags::IMAGE_ORIENTATION_PATIENT,
        "ImageOrientationPatient",
        6,
    )?;
    let spacing = floats(obj, path, tags::PIXEL_SPACING, "PixelSpacing", 2)?;
    let rows = int(obj, path, tags::ROWS, "Rows")?;
    let columns = int(obj, path, tags::COLUMNS, "Columns")?;
    if rows <= 0 || columns <= 0 || spacing.iter().any(|s| *s <= 0.0) {
        return Err(attribute_err(
            path,
            "image size",
            format!("{rows} rows × {columns} columns of {spacing:?} mm"),
        ));
    }
    Ok(SliceGeometry {
        position: [ipp[0], ipp[1], ipp[2]],
        orientation: [iop[0], iop[1], iop[2], iop[3], iop[4], iop[5]],
        pixel_spacing: [spacing[0], spacing[1]],
        rows: rows as usize,
        columns: columns as usize,
    })
}

/// Reads `series` into a volume: voxel `(i, j, k)` is column `i`, row `j`
/// of the `k`-th slice along the normal, rescaled to f32, with the RAS
/// affine of [`Geometry::ras_affine`].
pub fn read_series(series: &SeriesInfo) -> Result<Volume, DicomError> {
    let mut slices = Vec::with_capacity(series.files.len());
    for path in &series.files {
        let obj = open_header(path)?;
        slices.push((slice_geometry(&obj, path)?, path.display().to_string()));
    }
    let geometry = Geometry::from_slices(&slices).map_err(|e| DicomError::Series {
        series: series.uid.clone(),
        detail: e.0,
    })?;
    let (rows, columns) = (geometry.rows, geometry.columns);
    let depth = geometry.order.len();
    let mut data = Array4::<f32>::zeros((1, columns, rows, depth));
    for (k, &index) in geometry.order.iter().enumerate() {
        let path = &series.files[index];
        let obj = dicom_object::open_file(path).map_err(|e| DicomError::Read {
            path: path.clone(),
            detail: format!("not a readable DICOM file: {e}"),
        })?;
        let pixels = obj.decode_pixel_data().map_err(|e| DicomError::Read {
            path: path.clone(),
            detail: format!("cannot decode the pixel data: {e}"),
        })?;
        // The modality LUT (RescaleSlope/Intercept) is applied.
        let values: Vec<f32> = pixels.to_vec_frame(0).map_err(|e| DicomError::Read {
            path: path.clone(),
            detail: format!("cannot convert the pixel data: {e}"),
        })?;
        if values.len() != rows * columns {
            return Err(DicomError::Read {
                path: path.clone(),
                detail: format!(
                    "{} pixel values for {rows} rows × {columns} columns (more than one sample \
                     per pixel?)",
                    values.len()
                ),
            });
        }
        for j in 0..rows {
            for i in 0..columns {
                data[(0, i, j, k)] = values[j * columns + i];
            }
        }
    }
    Ok(Volume::new(data, geometry.ras_affine()))
}
