//! Where windows go: MONAI's scan interval and window origins along each
//! axis, clipping a window to the image, and walking the rows they share.

use super::InferenceError;

/// Calls `row(image_offset, window_offset, len)` for every Z-row a window
/// shares with the image (offsets into one class of each, C order).
pub(crate) fn for_each_row(
    dims: [usize; 3],
    roi: [usize; 3],
    spans: &[Span; 3],
    mut row: impl FnMut(usize, usize, usize),
) {
    let [sx, sy, sz] = *spans;
    for i in 0..sx.len {
        for j in 0..sy.len {
            let img = ((sx.img + i) * dims[1] + sy.img + j) * dims[2] + sz.img;
            let win = ((sx.win + i) * roi[1] + sy.win + j) * roi[2] + sz.win;
            row(img, win, sz.len);
        }
    }
}

/// The part of a window `[origin, origin + roi)` inside `[0, size)`: where it
/// starts in the image, where in the window, and how long it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub img: usize,
    pub win: usize,
    pub len: usize,
}

pub(crate) fn clip(origin: isize, roi: usize, size: usize) -> Span {
    let lo = origin.max(0);
    let hi = origin.saturating_add_unsigned(roi).min(size as isize);
    Span {
        img: lo as usize,
        win: (lo - origin) as usize,
        len: (hi - lo).max(0) as usize,
    }
}

/// MONAI's `_get_scan_interval` for one axis of `size` voxels: the window
/// fills an axis no longer than itself, else it steps by
/// `max(1, int(roi * (1 - overlap)))`.
pub fn scan_interval(size: usize, roi: usize, overlap: f64) -> usize {
    // MONAI computes the interval on the padded size, which equals roi on an
    // axis shorter than the window.
    if size.max(roi) == roi {
        roi
    } else {
        // `as` truncates toward zero, like Python's int() on a positive float.
        ((roi as f64 * (1.0 - overlap)) as usize).max(1)
    }
}

/// How many windows [`axis_origins`] gives, without listing them.
pub(crate) fn axis_window_count(size: usize, roi: usize, overlap: f64) -> usize {
    if size <= roi {
        1
    } else {
        (size - roi).div_ceil(scan_interval(size, roi, overlap)) + 1
    }
}

/// Window starts along one axis in the padded image's coordinates
/// (MONAI's `dense_patch_slices`): every `interval` voxels, the last one
/// moved back so that it ends exactly at the edge.
pub(super) fn axis_starts(size: usize, roi: usize, overlap: f64) -> Vec<usize> {
    let padded = size.max(roi);
    let interval = scan_interval(size, roi, overlap);
    let mut starts = Vec::new();
    let mut start = 0;
    loop {
        if start + roi >= padded {
            starts.push(padded - roi);
            return starts;
        }
        starts.push(start);
        start += interval;
    }
}

/// Window origins along one axis in image coordinates: MONAI pads an axis
/// shorter than the window with `(roi - size) / 2` voxels before it.
pub(crate) fn axis_origins(size: usize, roi: usize, overlap: f64) -> Vec<isize> {
    let pad_before = (roi.saturating_sub(size) / 2) as isize;
    axis_starts(size, roi, overlap)
        .into_iter()
        .map(|s| s as isize - pad_before)
        .collect()
}

/// Start corners of the windows MONAI cuts from an `image`-sized volume, in
/// the coordinates of the padded image (each axis shorter than the window is
/// padded to the window's size, `(roi - size) / 2` voxels before the image),
/// in MONAI's order: X slowest, Z fastest. A 0 in `roi` takes the image's size.
pub fn window_starts(
    image: [usize; 3],
    roi: [usize; 3],
    overlap: f64,
) -> Result<Vec<[usize; 3]>, InferenceError> {
    validate_overlap(overlap)?;
    let roi = resolve_roi(roi, image);
    if roi.contains(&0) {
        return Err(InferenceError::Image(format!(
            "image of {image:?} voxels has an empty axis"
        )));
    }
    let starts: [Vec<usize>; 3] = std::array::from_fn(|a| axis_starts(image[a], roi[a], overlap));
    let mut out = Vec::with_capacity(starts.iter().map(Vec::len).product());
    for &x in &starts[0] {
        for &y in &starts[1] {
            for &z in &starts[2] {
                out.push([x, y, z]);
            }
        }
    }
    Ok(out)
}

pub(crate) fn resolve_roi(roi: [usize; 3], dims: [usize; 3]) -> [usize; 3] {
    std::array::from_fn(|a| if roi[a] == 0 { dims[a] } else { roi[a] })
}

pub(crate) fn validate_overlap(overlap: f64) -> Result<(), InferenceError> {
    if (0.0..1.0).contains(&overlap) {
        Ok(())
    } else {
        Err(InferenceError::Settings(format!(
            "overlap must be at least 0 and below 1, got {overlap}"
        )))
    }
}
