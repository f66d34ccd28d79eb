//! PNG previews of a segmentation: the input's axial, coronal and sagittal
//! planes through the centre of the mask with the labels overlaid, so a
//! result can be checked at a glance without a NIfTI viewer.
//!
//! Display follows the radiological convention of clinical viewers: the
//! patient's right is on the left of axial and coronal views, anterior is up
//! in axial views, superior is up in coronal and sagittal views, and sagittal
//! views are seen from the patient's left (anterior on the left).
//!
//! The volume is first permuted/flipped to RAS with the same exact
//! reorientation the preprocessing uses (so an oblique scan is shown along
//! its closest canonical axes, never interpolated across slices), then each
//! plane is scaled in-plane to square millimetre pixels. Every decision
//! (centre, window, slices) is made on the reoriented arrays, so files that
//! hold the same world content in different storage orders give
//! byte-identical previews.

use std::path::{Path, PathBuf};

use nalgebra::Matrix4;
use ndarray::{ArrayView2, ArrayView3, Axis, s};

use crate::preprocess::Reorientation;
use crate::volume::{Volume, spacing_of};

/// The grey window maps these percentiles of the image to black and white:
/// robust to a few hot voxels and to the large zero background of MRI.
const WINDOW_PERCENTILES: (f64, f64) = (1.0, 99.0);
/// Above this many voxels the window is estimated from a regular subgrid;
/// a full copy of a 512^3 scan just for two percentiles would cost 512 MiB.
const WINDOW_SAMPLES: usize = 1 << 21;
/// The automatic pixel size keeps the largest panel side within these
/// bounds: small scans get enlarged enough to judge a border, large ones
/// stay a reasonably sized file.
const MIN_PANEL_PX: f64 = 256.0;
const MAX_PANEL_PX: f64 = 1024.0;
/// Largest panel side accepted with an explicit pixel size.
const PANEL_PX_LIMIT: f64 = 4096.0;
/// Margin around and gap between panels, in pixels.
const GAP: usize = 4;
/// Slightly lighter than black so the edge of a panel (air is black) shows.
const BACKGROUND: [u8; 3] = [24, 24, 24];
/// Colours of labels 1..=8; further labels get golden-angle hues.
const PALETTE: [[u8; 3]; 8] = [
    [255, 0, 0],
    [0, 210, 0],
    [40, 120, 255],
    [255, 220, 0],
    [0, 220, 220],
    [230, 0, 230],
    [255, 140, 0],
    [150, 90, 255],
];

#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error(
        "the labels have dims {labels:?} but the image has {image:?}: they must share its grid"
    )]
    GridMismatch {
        image: [usize; 3],
        labels: [usize; 3],
    },
    #[error("the image has no voxels (dims {dims:?}, {channels} channel(s))")]
    Empty { dims: [usize; 3], channels: usize },
    #[error("invalid preview options: {0}")]
    Options(String),
    #[error("cannot encode the preview {}: {source}", .path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: png::EncodingError,
    },
    #[error(transparent)]
    Write(#[from] crate::fsio::WriteError),
}

/// How a preview is drawn.
#[derive(Clone, Debug, PartialEq)]
pub struct PreviewOptions {
    /// Millimetres per output pixel; `None` starts from the finest voxel
    /// spacing and rescales so the largest panel is 256..=1024 pixels.
    pub pixel_mm: Option<f64>,
    /// Opacity of the label fill in [0, 1]; the outline is always opaque.
    pub alpha: f32,
    /// Add a second row of axial slices at 25, 50 and 75 % of the mask's
    /// inferior-superior extent (of the volume's when the mask is empty).
    pub axial_row: bool,
}

impl Default for PreviewOptions {
    fn default() -> Self {
        PreviewOptions {
            pixel_mm: None,
            alpha: 0.4,
            axial_row: true,
        }
    }
}

/// An 8-bit RGB image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// RGB triples, row by row from the top-left pixel.
    pub data: Vec<u8>,
}

impl RgbImage {
    fn filled(width: usize, height: usize, colour: [u8; 3]) -> Self {
        RgbImage {
            width,
            height,
            data: colour.repeat(width * height),
        }
    }

    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = 3 * (y * self.width + x);
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    fn set(&mut self, x: usize, y: usize, c: [u8; 3]) {
        let i = 3 * (y * self.width + x);
        self.data[i..i + 3].copy_from_slice(&c);
    }

    fn blit(&mut self, src: &RgbImage, x0: usize, y0: usize) {
        for y in 0..src.height {
            let from = &src.data[3 * y * src.width..3 * (y + 1) * src.width];
            let at = 3 * ((y0 + y) * self.width + x0);
            self.data[at..at + from.len()].copy_from_slice(from);
        }
    }

    /// The image as a PNG file's bytes.
    pub fn encode_png(&self) -> Result<Vec<u8>, png::EncodingError> {
        let w = u32::try_from(self.width).map_err(|_| png::EncodingError::LimitsExceeded)?;
        let h = u32::try_from(self.height).map_err(|_| png::EncodingError::LimitsExceeded)?;
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&self.data)?;
        writer.finish()?;
        Ok(out)
    }

    /// Writes the image as a PNG, atomically: a reader never sees a partial
    /// file, and a failure leaves whatever was at `path` untouched.
    pub fn write_png(&self, path: &Path) -> Result<(), PreviewError> {
        let bytes = self.encode_png().map_err(|source| PreviewError::Encode {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(crate::fsio::write_atomic(path, &bytes)?)
    }
}

/// The display colour of a label (`label > 0`).
pub fn label_colour(label: u8) -> [u8; 3] {
    let l = usize::from(label.max(1));
    if l <= PALETTE.len() {
        return PALETTE[l - 1];
    }
    // Consecutive golden-angle hues stay far apart however many labels.
    let h = ((l - 1) as f64 * 137.507_764).rem_euclid(360.0) / 60.0;
    let x = 1.0 - (h.rem_euclid(2.0) - 1.0).abs();
    let (r, g, b) = match h as u32 {
        0 => (1.0, x, 0.0),
        1 => (x, 1.0, 0.0),
        2 => (0.0, 1.0, x),
        3 => (0.0, x, 1.0),
        4 => (x, 0.0, 1.0),
        _ => (1.0, 0.0, x),
    };
    [r, g, b].map(|c: f64| (c * 255.0).round() as u8)
}

/// Renders the preview mosaic of `image` (its first channel) with `labels`
/// (`[X, Y, Z]` on the image's grid, 0 = background) overlaid.
///
/// The first row holds the axial, coronal and sagittal planes through the
/// centroid of the labelled voxels (the volume's centre when there are
/// none); with [`PreviewOptions::axial_row`] a second row adds three axial
/// slices across the mask.
pub fn render_preview(
    image: &Volume,
    labels: ArrayView3<u8>,
    opts: &PreviewOptions,
) -> Result<RgbImage, PreviewError> {
    let dims = image.dims();
    if image.channels() == 0 || dims.contains(&0) {
        return Err(PreviewError::Empty {
            dims,
            channels: image.channels(),
        });
    }
    let ldims: [usize; 3] = labels.dim().into();
    if ldims != dims {
        return Err(PreviewError::GridMismatch {
            image: dims,
            labels: ldims,
        });
    }
    if !(0.0..=1.0).contains(&opts.alpha) {
        return Err(PreviewError::Options(format!(
            "alpha {} is not in [0, 1]",
            opts.alpha
        )));
    }
    let reo = Reorientation::to_ras(&image.affine, dims);
    let ras = Ras {
        image: reo
            .apply_view(image.data.view())
            .index_axis_move(Axis(0), 0),
        labels: reo
            .apply_view(labels.insert_axis(Axis(0)))
            .index_axis_move(Axis(0), 0),
        spacing: spacing_of(&reo.apply_affine(&image.affine)),
    };
    let px_mm = pixel_mm(&ras, opts.pixel_mm)?;
    let window = window(ras.image);
    let extent = mask_extent(labels, &reo).unwrap_or_else(|| {
        let d: [usize; 3] = ras.image.dim().into();
        Extent {
            centre: d.map(|n| n / 2),
            lo: [0; 3],
            hi: d.map(|n| n - 1),
        }
    });
    let draw = |view: View, slice: usize| ras.panel(view, slice, window, px_mm, opts.alpha);
    let c = extent.centre;
    let mut rows = vec![vec![
        draw(View::Axial, c[2]),
        draw(View::Coronal, c[1]),
        draw(View::Sagittal, c[0]),
    ]];
    if opts.axial_row {
        let (lo, hi) = (extent.lo[2], extent.hi[2]);
        rows.push(
            [1, 2, 3]
                .into_iter()
                .map(|q| draw(View::Axial, lo + (q * (hi - lo) + 2) / 4))
                .collect(),
        );
    }
    Ok(mosaic(&rows))
}

/// [`render_preview`], written to `path` as a PNG (atomically).
pub fn write_preview_png(
    path: &Path,
    image: &Volume,
    labels: ArrayView3<u8>,
    opts: &PreviewOptions,
) -> Result<(), PreviewError> {
    render_preview(image, labels, opts)?.write_png(path)
}

/// The planes of the mosaic, named by the RAS axis they hold fixed.
#[derive(Clone, Copy, Debug)]
enum View {
    Axial,
    Coronal,
    Sagittal,
}

impl View {
    fn slice_axis(self) -> usize {
        match self {
            View::Axial => 2,
            View::Coronal => 1,
            View::Sagittal => 0,
        }
    }
}

/// Image and labels permuted/flipped so index `[x, y, z]` grows toward the
/// patient's right, anterior and superior.
struct Ras<'a> {
    image: ArrayView3<'a, f32>,
    labels: ArrayView3<'a, u8>,
    spacing: [f64; 3],
}

/// One output pixel's source positions along a voxel axis.
struct Tap {
    i0: usize,
    i1: usize,
    frac: f32,
    nearest: usize,
}

/// Pixel `p` of `px` covers the same fraction of the axis as voxels do, so
/// the first and last voxels get their full width rather than half of it.
fn taps(n: usize, px: usize) -> Vec<Tap> {
    (0..px)
        .map(|p| {
            let u = (p as f64 + 0.5) * n as f64 / px as f64;
            let t = (u - 0.5).clamp(0.0, (n - 1) as f64);
            let i0 = t.floor() as usize;
            Tap {
                i0,
                i1: (i0 + 1).min(n - 1),
                frac: (t - i0 as f64) as f32,
                nearest: (u.floor() as usize).min(n - 1),
            }
        })
        .collect()
}

impl Ras<'_> {
    fn panel(
        &self,
        view: View,
        slice: usize,
        window: (f32, f32),
        px_mm: f64,
        alpha: f32,
    ) -> RgbImage {
        let axis = view.slice_axis();
        let mut img: ArrayView2<f32> = self.image.index_axis(Axis(axis), slice);
        let mut lab: ArrayView2<u8> = self.labels.index_axis(Axis(axis), slice);
        // The two remaining RAS axes become columns and rows in that order
        // (x, y for axial; x, z coronal; y, z sagittal). Radiological display
        // runs both toward decreasing RAS: right on the left, anterior or
        // superior on top.
        for a in 0..2 {
            img.invert_axis(Axis(a));
            lab.invert_axis(Axis(a));
        }
        let [col_axis, row_axis] = match view {
            View::Axial => [0, 1],
            View::Coronal => [0, 2],
            View::Sagittal => [1, 2],
        };
        let (nc, nr) = img.dim();
        let w = px_count(nc as f64 * self.spacing[col_axis], px_mm);
        let h = px_count(nr as f64 * self.spacing[row_axis], px_mm);
        let cols = taps(nc, w);
        let rows = taps(nr, h);

        let mut labels = Vec::with_capacity(w * h);
        for r in &rows {
            labels.extend(cols.iter().map(|c| lab[[c.nearest, r.nearest]]));
        }
        let mut out = RgbImage::filled(w, h, [0; 3]);
        for (y, r) in rows.iter().enumerate() {
            for (x, c) in cols.iter().enumerate() {
                let at = |i, j| img[[i, j]];
                let top = at(c.i0, r.i0) * (1.0 - c.frac) + at(c.i1, r.i0) * c.frac;
                let bottom = at(c.i0, r.i1) * (1.0 - c.frac) + at(c.i1, r.i1) * c.frac;
                let g = grey(top * (1.0 - r.frac) + bottom * r.frac, window);
                let l = labels[y * w + x];
                let px = if l == 0 {
                    [g; 3]
                } else {
                    let colour = label_colour(l);
                    let differs = |xx: usize, yy: usize| labels[yy * w + xx] != l;
                    let edge = (x > 0 && differs(x - 1, y))
                        || (x + 1 < w && differs(x + 1, y))
                        || (y > 0 && differs(x, y - 1))
                        || (y + 1 < h && differs(x, y + 1));
                    if edge {
                        colour
                    } else {
                        colour.map(|c| {
                            (f32::from(g) * (1.0 - alpha) + f32::from(c) * alpha).round() as u8
                        })
                    }
                };
                out.set(x, y, px);
            }
        }
        out
    }
}

fn px_count(extent_mm: f64, px_mm: f64) -> usize {
    ((extent_mm / px_mm).round() as usize).max(1)
}

fn pixel_mm(ras: &Ras, requested: Option<f64>) -> Result<f64, PreviewError> {
    let dims: [usize; 3] = ras.image.dim().into();
    let largest = (0..3)
        .map(|a| dims[a] as f64 * ras.spacing[a])
        .fold(0.0, f64::max);
    match requested {
        Some(p) if p.is_finite() && p > 0.0 => {
            if largest / p > PANEL_PX_LIMIT {
                return Err(PreviewError::Options(format!(
                    "a pixel size of {p} mm makes a {largest:.0} mm wide view more than \
                     {PANEL_PX_LIMIT} pixels"
                )));
            }
            Ok(p)
        }
        Some(p) => Err(PreviewError::Options(format!(
            "pixel size {p} mm is not positive"
        ))),
        None => {
            let finest = ras.spacing.iter().copied().fold(f64::INFINITY, f64::min);
            Ok(finest.clamp(largest / MAX_PANEL_PX, largest / MIN_PANEL_PX))
        }
    }
}

fn grey(v: f32, (lo, hi): (f32, f32)) -> u8 {
    if hi > lo {
        (((v - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0).round() as u8
    } else if v > lo {
        255
    } else {
        0
    }
}

/// The grey window's (low, high) intensities.
fn window(image: ArrayView3<f32>) -> (f32, f32) {
    let step = ((image.len() as f64 / WINDOW_SAMPLES as f64).cbrt().ceil() as usize).max(1);
    // The subgrid is taken in RAS order so it does not depend on how the
    // file stores its axes.
    let mut v: Vec<f32> = image
        .slice(s![..;step, ..;step, ..;step])
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .collect();
    if v.is_empty() {
        return (0.0, 1.0);
    }
    let (lo, hi) = WINDOW_PERCENTILES;
    (percentile(&mut v, lo), percentile(&mut v, hi))
}

fn percentile(v: &mut [f32], q: f64) -> f32 {
    let i = ((q / 100.0) * (v.len() - 1) as f64).round() as usize;
    *v.select_nth_unstable_by(i, f32::total_cmp).1
}

/// Where the labelled voxels lie, as RAS voxel indices.
struct Extent {
    /// Rounded centroid.
    centre: [usize; 3],
    lo: [usize; 3],
    hi: [usize; 3],
}

/// The labelled voxels' extent, `None` when there are none. Scans the labels
/// in storage order (fast) and maps the integer statistics to RAS exactly,
/// so the result is the same for any storage order of the same content.
fn mask_extent(labels: ArrayView3<u8>, reo: &Reorientation) -> Option<Extent> {
    let mut count = 0u64;
    let mut sum = [0u64; 3];
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    for ((i, j, k), &l) in labels.indexed_iter() {
        if l > 0 {
            count += 1;
            for (a, v) in [i, j, k].into_iter().enumerate() {
                sum[a] += v as u64;
                lo[a] = lo[a].min(v);
                hi[a] = hi[a].max(v);
            }
        }
    }
    if count == 0 {
        return None;
    }
    // Applied to the identity, the reorientation's affine is its index map:
    // new voxel index -> source voxel index, a signed permutation.
    let t: Matrix4<f64> = reo.apply_affine(&Matrix4::identity());
    let dims: [usize; 3] = labels.dim().into();
    let mut out = Extent {
        centre: [0; 3],
        lo: [0; 3],
        hi: [0; 3],
    };
    for a in 0..3 {
        let src = (0..3).find(|&j| t[(j, a)] != 0.0).unwrap_or(a);
        let last = dims[src] - 1;
        let (s, l, h) = if t[(src, a)] < 0.0 {
            (
                count * last as u64 - sum[src],
                last - hi[src],
                last - lo[src],
            )
        } else {
            (sum[src], lo[src], hi[src])
        };
        out.centre[a] = ((2 * s + count) / (2 * count)) as usize;
        out.lo[a] = l;
        out.hi[a] = h;
    }
    Some(out)
}

/// Rows of panels, each row centred, panels vertically centred in their row.
fn mosaic(rows: &[Vec<RgbImage>]) -> RgbImage {
    let row_width = |r: &[RgbImage]| r.iter().map(|p| p.width + GAP).sum::<usize>() + GAP;
    let row_height = |r: &[RgbImage]| r.iter().map(|p| p.height).max().unwrap_or(0);
    let width = rows.iter().map(|r| row_width(r)).max().unwrap_or(GAP);
    let height = rows.iter().map(|r| row_height(r) + GAP).sum::<usize>() + GAP;
    let mut out = RgbImage::filled(width, height, BACKGROUND);
    let mut y = GAP;
    for r in rows {
        let rh = row_height(r);
        let mut x = GAP + (width - row_width(r)) / 2;
        for p in r {
            out.blit(p, x, y + (rh - p.height) / 2);
            x += p.width + GAP;
        }
        y += rh + GAP;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array3, Array4};
    use std::fs::{self, File};

    /// A RAS volume whose content differs along every axis and direction,
    /// so any flip or swap of the display would show.
    fn ras_volume(dims: [usize; 3], spacing: [f64; 3]) -> Volume {
        let data = Array4::from_shape_fn((1, dims[0], dims[1], dims[2]), |(_, x, y, z)| {
            (x * x + 3 * y + 7 * z * z + (x * y) % 5) as f32
        });
        let mut affine = Matrix4::identity();
        for a in 0..3 {
            affine[(a, a)] = spacing[a];
        }
        affine[(0, 3)] = -30.0;
        affine[(1, 3)] = 12.0;
        affine[(2, 3)] = -7.5;
        Volume::new(data, affine)
    }

    fn labels_box(dims: [usize; 3], lo: [usize; 3], hi: [usize; 3], l: u8) -> Array3<u8> {
        Array3::from_shape_fn((dims[0], dims[1], dims[2]), |(x, y, z)| {
            let inside =
                x >= lo[0] && x < hi[0] && y >= lo[1] && y < hi[1] && z >= lo[2] && z < hi[2];
            if inside { l } else { 0 }
        })
    }

    /// Stores `vol`/`labels` with voxel axis `a` reversed where `flip[a]`,
    /// keeping every voxel at its world position.
    fn flipped(vol: &Volume, labels: &Array3<u8>, flip: [bool; 3]) -> (Volume, Array3<u8>) {
        let mut data = vol.data.clone();
        let mut lab = labels.clone();
        let mut affine = vol.affine;
        for a in 0..3 {
            if flip[a] {
                data.invert_axis(Axis(a + 1));
                lab.invert_axis(Axis(a));
                let last = (vol.dims()[a] - 1) as f64;
                for r in 0..3 {
                    affine[(r, 3)] += affine[(r, a)] * last;
                    affine[(r, a)] = -affine[(r, a)];
                }
            }
        }
        let data = data.as_standard_layout().to_owned();
        let lab = lab.as_standard_layout().to_owned();
        (Volume::new(data, affine), lab)
    }

    /// Stores voxel axis `order[a]` of the original as axis `a`.
    fn permuted(vol: &Volume, labels: &Array3<u8>, order: [usize; 3]) -> (Volume, Array3<u8>) {
        let data = vol
            .data
            .view()
            .permuted_axes([0, 1 + order[0], 1 + order[1], 1 + order[2]])
            .as_standard_layout()
            .to_owned();
        let lab = labels
            .view()
            .permuted_axes(order)
            .as_standard_layout()
            .to_owned();
        let mut affine = vol.affine;
        for (a, &o) in order.iter().enumerate() {
            for r in 0..3 {
                affine[(r, a)] = vol.affine[(r, o)];
            }
        }
        (Volume::new(data, affine), lab)
    }

    fn opts(px: f64) -> PreviewOptions {
        PreviewOptions {
            pixel_mm: Some(px),
            ..PreviewOptions::default()
        }
    }

    fn is_tinted(p: [u8; 3], label: u8) -> bool {
        p != [p[0]; 3] && {
            let c = label_colour(label);
            // The dominant channel of the label colour is the brightest.
            let main = (0..3).max_by_key(|&i| c[i]).unwrap();
            (0..3).all(|i| i == main || p[main] > p[i])
        }
    }

    #[test]
    fn mosaic_dims_follow_the_extent_in_millimetres() {
        // 10 slices of 3 mm are as tall as 30 voxels of 1 mm.
        let dims = [20, 30, 10];
        let vol = ras_volume(dims, [1.0, 1.0, 3.0]);
        let labels = labels_box(dims, [5, 5, 2], [15, 20, 8], 1);
        let img = render_preview(&vol, labels.view(), &opts(1.0)).unwrap();
        // Row 1: axial 20x30, coronal 20x30, sagittal 30x30; row 2: 3 axials.
        assert_eq!(img.width, GAP * 4 + 20 + 20 + 30);
        assert_eq!(img.height, GAP * 3 + 30 + 30);
        assert_eq!(img.data.len(), img.width * img.height * 3);
        let one_row = PreviewOptions {
            axial_row: false,
            ..opts(0.5)
        };
        let img = render_preview(&vol, labels.view(), &one_row).unwrap();
        assert_eq!(img.width, GAP * 4 + 40 + 40 + 60);
        assert_eq!(img.height, GAP * 2 + 60);
    }

    #[test]
    fn automatic_pixel_size_enlarges_small_volumes() {
        let dims = [8, 12, 6];
        let vol = ras_volume(dims, [2.0, 2.0, 2.0]);
        let labels = Array3::zeros(dims);
        let img = render_preview(&vol, labels.view(), &PreviewOptions::default()).unwrap();
        // The largest extent (24 mm along y) becomes 256 px.
        assert_eq!(img.height, GAP * 3 + 256 + 256);
        // Axial 16 mm wide, coronal 16, sagittal 24.
        let x = |mm: f64| (mm * 256.0 / 24.0).round() as usize;
        assert_eq!(img.width, GAP * 4 + x(16.0) * 2 + x(24.0));
    }

    #[test]
    fn overlay_sits_where_the_mask_is_in_radiological_orientation() {
        // The box lies toward the patient's right, anterior and superior;
        // with 40 voxels of 1 mm and 1 mm pixels each panel is 40x40 and
        // the box shows at columns and rows 4..12 of all three views:
        // right on the left, anterior on top (axial) or left (sagittal),
        // superior on top.
        let dims = [40, 40, 40];
        let vol = ras_volume(dims, [1.0; 3]);
        let labels = labels_box(dims, [28, 28, 28], [36, 36, 36], 1);
        let img = render_preview(&vol, labels.view(), &opts(1.0)).unwrap();
        for panel in 0..3 {
            let x0 = GAP + panel * (40 + GAP);
            for r in 0..40 {
                for c in 0..40 {
                    let p = img.pixel(x0 + c, GAP + r);
                    let inside = (4..12).contains(&c) && (4..12).contains(&r);
                    assert_eq!(is_tinted(p, 1), inside, "panel {panel} ({c}, {r}): {p:?}");
                    let edge = inside && (c == 4 || c == 11 || r == 4 || r == 11);
                    assert_eq!(
                        p == label_colour(1),
                        edge,
                        "panel {panel} ({c}, {r}): {p:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn each_label_gets_its_own_colour() {
        let dims = [30, 30, 30];
        let vol = ras_volume(dims, [1.0; 3]);
        let mut labels = labels_box(dims, [5, 5, 5], [14, 25, 25], 1);
        labels.zip_mut_with(&labels_box(dims, [16, 5, 5], [25, 25, 25], 2), |a, b| {
            *a += b
        });
        let img = render_preview(&vol, labels.view(), &opts(1.0)).unwrap();
        let pixels: Vec<[u8; 3]> = img
            .data
            .chunks_exact(3)
            .map(|c| [c[0], c[1], c[2]])
            .collect();
        for l in [1, 2] {
            assert!(pixels.iter().any(|&p| is_tinted(p, l)), "label {l}");
            assert!(pixels.contains(&label_colour(l)), "outline of label {l}");
        }
        assert_ne!(label_colour(1), label_colour(2));
        assert_ne!(label_colour(9), label_colour(10));

        let none = render_preview(&vol, Array3::zeros(dims).view(), &opts(1.0)).unwrap();
        assert!(
            none.data
                .chunks_exact(3)
                .all(|p| p[0] == p[1] && p[1] == p[2]),
            "no labels, no colour"
        );
    }

    #[test]
    fn storage_order_does_not_change_the_preview() {
        let dims = [23, 31, 17];
        let vol = ras_volume(dims, [1.0, 1.5, 2.5]);
        let labels = labels_box(dims, [3, 10, 4], [15, 29, 11], 1);
        let reference = render_preview(&vol, labels.view(), &PreviewOptions::default()).unwrap();
        let png = reference.encode_png().unwrap();

        let (lps, lps_labels) = flipped(&vol, &labels, [true, true, false]);
        let (pir, pir_labels) = permuted(&lps, &lps_labels, [1, 2, 0]);
        let (odd, odd_labels) = flipped(&pir, &pir_labels, [false, true, true]);
        for (name, v, l) in [
            ("LPS", &lps, &lps_labels),
            ("permuted LPS", &pir, &pir_labels),
            ("permuted and flipped", &odd, &odd_labels),
        ] {
            let img = render_preview(v, l.view(), &PreviewOptions::default()).unwrap();
            assert!(img == reference, "{name}");
            assert_eq!(img.encode_png().unwrap(), png, "{name}");
        }

        // The same voxels with the RAS affine are a mirrored world: the
        // test content is asymmetric enough to notice.
        let wrong = Volume::new(lps.data.clone(), vol.affine);
        let img = render_preview(&wrong, lps_labels.view(), &PreviewOptions::default()).unwrap();
        assert!(img != reference);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let vol = ras_volume([4, 5, 6], [1.0; 3]);
        let err = render_preview(&vol, Array3::zeros((4, 5, 7)).view(), &opts(1.0)).unwrap_err();
        assert!(matches!(err, PreviewError::GridMismatch { .. }), "{err}");
        let labels = Array3::zeros((4, 5, 6));
        for o in [opts(0.0), opts(f64::NAN), opts(1e-4)] {
            let err = render_preview(&vol, labels.view(), &o).unwrap_err();
            assert!(matches!(err, PreviewError::Options(_)), "{err}");
        }
        let o = PreviewOptions {
            alpha: 1.5,
            ..opts(1.0)
        };
        assert!(render_preview(&vol, labels.view(), &o).is_err());
    }

    #[test]
    fn png_is_written_atomically_and_decodes() {
        let dir = tempfile::tempdir().unwrap();
        let dims = [12, 14, 10];
        let vol = ras_volume(dims, [1.0, 1.0, 2.0]);
        let labels = labels_box(dims, [2, 2, 2], [8, 8, 8], 1);
        let path = dir.path().join("p.png");
        fs::write(&path, b"old").unwrap();
        write_preview_png(&path, &vol, labels.view(), &opts(1.0)).unwrap();
        let expected = render_preview(&vol, labels.view(), &opts(1.0)).unwrap();

        let decoder = png::Decoder::new(std::io::BufReader::new(File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(
            (info.width as usize, info.height as usize),
            (expected.width, expected.height)
        );
        assert_eq!(&buf[..info.buffer_size()], &expected.data[..]);

        let missing = dir.path().join("no-such-folder").join("p.png");
        let err = write_preview_png(&missing, &vol, labels.view(), &opts(1.0)).unwrap_err();
        assert!(matches!(err, PreviewError::Write(_)), "{err}");
        assert!(err.to_string().contains("no-such-folder/p.png"), "{err}");

        // A folder is refused before anything is written.
        let folder = dir.path().join("taken.png");
        fs::create_dir(&folder).unwrap();
        let err = write_preview_png(&folder, &vol, labels.view(), &opts(1.0)).unwrap_err();
        assert!(err.to_string().contains("taken.png"), "{err}");
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["p.png", "taken.png"]);
    }
}
