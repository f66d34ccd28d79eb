//! The volume a set of slices makes: their order along the normal, the
//! step between them and the affine, with the checks that make a stack of
//! slices a volume (one orientation, one grid, even spacing, no tilt).

use std::fmt::Display;

use nalgebra::{Matrix4, Vector3};

/// Orientation cosines and pixel spacings may differ this much between the
/// slices of one volume (dicom2nifti allows 1e-3 on orientation).
const SAME_TOL: f64 = 1e-3;
/// Two slices closer than this (mm) along the normal are one position.
const SAME_POSITION_MM: f64 = 1e-3;
/// A gap between slices may differ from the mean step by this much
/// (dicom2nifti: 5 % or 0.1 mm) before the spacing counts as uneven.
const GAP_RTOL: f64 = 0.05;
const GAP_ATOL_MM: f64 = 0.1;
/// The step between slices may leave the normal by this fraction of its
/// length before it counts as a gantry tilt (dicom2nifti: 5 %).
const TILT_RTOL: f64 = 0.05;

/// What one slice's header says about where its pixels are.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceGeometry {
    /// ImagePositionPatient: the first pixel's centre, LPS mm.
    pub position: [f64; 3],
    /// ImageOrientationPatient: row direction (along a row, increasing
    /// column), then column direction (increasing row).
    pub orientation: [f64; 6],
    /// PixelSpacing: between rows, then between columns (mm).
    pub pixel_spacing: [f64; 2],
    pub rows: usize,
    pub columns: usize,
}

/// Why slices do not make one volume (the message names the slices).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct GeometryError(pub String);

/// The volume the slices make.
#[derive(Clone, Debug, PartialEq)]
pub struct Geometry {
    pub rows: usize,
    pub columns: usize,
    /// Indices into the input slices, in order along the normal.
    pub order: Vec<usize>,
    row_dir: Vector3<f64>,
    col_dir: Vector3<f64>,
    pixel_spacing: [f64; 2],
    first: Vector3<f64>,
    step: Vector3<f64>,
}

fn v3(a: &[f64]) -> Vector3<f64> {
    Vector3::new(a[0], a[1], a[2])
}

impl Geometry {
    /// The volume of `slices` (each with a name for messages), or why they
    /// do not make one.
    pub fn from_slices<N: Display>(
        slices: &[(SliceGeometry, N)],
    ) -> Result<Geometry, GeometryError> {
        Self::build(slices).map_err(GeometryError)
    }

    fn build<N: Display>(slices: &[(SliceGeometry, N)]) -> Result<Geometry, String> {
        let Some((first, first_name)) = slices.first() else {
            return Err("no slices".into());
        };
        if slices.len() < 2 {
            return Err(format!(
                "one slice ({first_name}): a volume needs at least two to know the spacing between slices"
            ));
        }
        for (s, name) in &slices[1..] {
            if (s.rows, s.columns) != (first.rows, first.columns)
                || s.pixel_spacing
                    .iter()
                    .zip(first.pixel_spacing)
                    .any(|(a, b)| (a - b).abs() > SAME_TOL * b)
            {
                return Err(format!(
                    "{name} is {}×{} pixels of {:?} mm, {first_name} {}×{} of {:?} mm: one series, \
                     two grids",
                    s.rows,
                    s.columns,
                    s.pixel_spacing,
                    first.rows,
                    first.columns,
                    first.pixel_spacing
                ));
            }
            if s.orientation
                .iter()
                .zip(first.orientation)
                .any(|(a, b)| (a - b).abs() > SAME_TOL)
            {
                return Err(format!(
                    "mixed orientations: {name} has ImageOrientationPatient {:?}, {first_name} {:?}",
                    s.orientation, first.orientation
                ));
            }
        }
        let row_dir = v3(&first.orientation[0..3]);
        let col_dir = v3(&first.orientation[3..6]);
        if (row_dir.norm() - 1.0).abs() > SAME_TOL
            || (col_dir.norm() - 1.0).abs() > SAME_TOL
            || row_dir.dot(&col_dir).abs() > SAME_TOL
        {
            return Err(format!(
                "{first_name}: ImageOrientationPatient {:?} is not two orthogonal unit vectors",
                first.orientation
            ));
        }
        let normal = row_dir.cross(&col_dir);
        let along = |s: &SliceGeometry| v3(&s.position).dot(&normal);
        let mut order: Vec<usize> = (0..slices.len()).collect();
        order.sort_by(|&a, &b| along(&slices[a].0).total_cmp(&along(&slices[b].0)));

        let depth: Vec<f64> = order.iter().map(|&i| along(&slices[i].0)).collect();
        let name = |k: usize| &slices[order[k]].1;
        for k in 1..depth.len() {
            if depth[k] - depth[k - 1] < SAME_POSITION_MM {
                return Err(format!(
                    "{} and {} are at the same position along the slice normal",
                    name(k - 1),
                    name(k)
                ));
            }
        }
        let n = depth.len();
        // The median gap is the series' step: a missing slice makes one
        // gap twice as wide without moving it.
        let mut gaps: Vec<f64> = depth.windows(2).map(|w| w[1] - w[0]).collect();
        gaps.sort_by(f64::total_cmp);
        let mean = gaps[gaps.len() / 2];
        for k in 1..n {
            let gap = depth[k] - depth[k - 1];
            if (gap - mean).abs() > GAP_ATOL_MM.max(GAP_RTOL * mean) {
                let missing = (gap / mean).round() as i64 - 1;
                let what = if missing >= 1 {
                    format!(
                        "{missing} slice(s) missing between {} and {}",
                        name(k - 1),
                        name(k)
                    )
                } else {
                    format!("{} and {} are {gap:.3} mm apart", name(k - 1), name(k))
                };
                return Err(format!(
                    "uneven slice spacing: {what}, where the series' step is {mean:.3} mm"
                ));
            }
        }
        let p0 = v3(&slices[order[0]].0.position);
        let pn = v3(&slices[order[n - 1]].0.position);
        let step = (pn - p0) / (n - 1) as f64;
        let off_normal = (step - normal * step.dot(&normal)).norm();
        if off_normal > TILT_RTOL * step.norm() {
            let degrees = (off_normal / step.norm()).asin().to_degrees();
            return Err(format!(
                "gantry tilt: consecutive slices step {off_normal:.3} mm off the slice normal \
                 ({degrees:.1}°); tilted series are not supported"
            ));
        }
        Ok(Geometry {
            rows: first.rows,
            columns: first.columns,
            order,
            row_dir,
            col_dir,
            pixel_spacing: first.pixel_spacing,
            first: p0,
            step,
        })
    }

    /// Voxel `(i, j, k)` (column, row, slice in order) to RAS millimetres:
    /// the DICOM (LPS) affine with its first two rows negated.
    pub fn ras_affine(&self) -> Matrix4<f64> {
        let cols = [
            self.row_dir * self.pixel_spacing[1],
            self.col_dir * self.pixel_spacing[0],
            self.step,
            self.first,
        ];
        let mut a = Matrix4::identity();
        for (c, v) in cols.iter().enumerate() {
            a[(0, c)] = -v.x;
            a[(1, c)] = -v.y;
            a[(2, c)] = v.z;
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use nalgebra::Vector4;

    use super::*;

    const AXIAL: [f64; 6] = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0];

    fn slice(z: f64, orientation: [f64; 6]) -> SliceGeometry {
        SliceGeometry {
            position: [-100.0, -120.0, z],
            orientation,
            pixel_spacing: [0.5, 0.75],
            rows: 4,
            columns: 3,
        }
    }

    fn named(v: Vec<SliceGeometry>) -> Vec<(SliceGeometry, String)> {
        v.into_iter()
            .enumerate()
            .map(|(i, s)| (s, format!("f{i}")))
            .collect()
    }

    #[test]
    fn axial_slices_in_any_order_make_a_ras_volume() {
        // Files listed 3, 1, 0, 2 by position: the order comes from the
        // positions, not the list.
        let s = named(vec![
            slice(7.5, AXIAL),
            slice(2.5, AXIAL),
            slice(0.0, AXIAL),
            slice(5.0, AXIAL),
        ]);
        let g = Geometry::from_slices(&s).unwrap();
        assert_eq!(g.order, [2, 1, 3, 0]);
        let a = g.ras_affine();
        // Column i along L->R is -x in RAS; row j along P is -y; k along S.
        let at = |i: f64, j: f64, k: f64| a * Vector4::new(i, j, k, 1.0);
        assert_eq!(at(0.0, 0.0, 0.0), Vector4::new(100.0, 120.0, 0.0, 1.0));
        assert_eq!(at(1.0, 0.0, 0.0), Vector4::new(99.25, 120.0, 0.0, 1.0));
        assert_eq!(at(0.0, 1.0, 0.0), Vector4::new(100.0, 119.5, 0.0, 1.0));
        assert_eq!(at(0.0, 0.0, 3.0), Vector4::new(100.0, 120.0, 7.5, 1.0));
    }

    #[test]
    fn an_oblique_stack_keeps_each_pixel_where_dicom_puts_it() {
        let (c, s) = (20f64.to_radians().cos(), 20f64.to_radians().sin());
        let iop = [1.0, 0.0, 0.0, 0.0, c, -s];
        let normal = Vector3::new(0.0, s, c);
        let slices: Vec<SliceGeometry> = (0..5)
            .rev()
            .map(|k| {
                let p = Vector3::new(-10.0, -20.0, 30.0) + normal * (2.0 * k as f64);
                SliceGeometry {
                    position: [p.x, p.y, p.z],
                    ..slice(0.0, iop)
                }
            })
            .collect();
        let g = Geometry::from_slices(&named(slices.clone())).unwrap();
        assert_eq!(g.order, [4, 3, 2, 1, 0]);
        let a = g.ras_affine();
        // Pixel (column 2, row 3) of the slice at k = 1 (input index 3):
        // LPS = IPP + 2 * 0.75 * row_dir + 3 * 0.5 * col_dir.
        let lps = v3(&slices[3].position)
            + Vector3::new(1.0, 0.0, 0.0) * 1.5
            + Vector3::new(0.0, c, -s) * 1.5;
        let ras = a * Vector4::new(2.0, 3.0, 1.0, 1.0);
        assert!((ras.x + lps.x).abs() < 1e-9 && (ras.y + lps.y).abs() < 1e-9);
        assert!((ras.z - lps.z).abs() < 1e-9);
    }

    #[test]
    fn stacks_that_are_not_one_volume_are_refused_naming_the_files() {
        let e = Geometry::from_slices(&named(vec![slice(0.0, AXIAL), slice(0.0, AXIAL)]))
            .unwrap_err()
            .0;
        assert!(e.contains("f0 and f1 are at the same position"), "{e}");

        let gap = named(vec![
            slice(0.0, AXIAL),
            slice(2.0, AXIAL),
            slice(6.0, AXIAL),
            slice(8.0, AXIAL),
        ]);
        let e = Geometry::from_slices(&gap).unwrap_err().0;
        assert!(e.contains("1 slice(s) missing between f1 and f2"), "{e}");

        let coronal = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0];
        let e = Geometry::from_slices(&named(vec![slice(0.0, AXIAL), slice(2.0, coronal)]))
            .unwrap_err()
            .0;
        assert!(e.contains("mixed orientations: f1"), "{e}");

        // Each slice shifted along y as z grows: a tilted gantry.
        let tilted: Vec<SliceGeometry> = (0..4)
            .map(|k| SliceGeometry {
                position: [0.0, 0.5 * k as f64, 2.0 * k as f64],
                ..slice(0.0, AXIAL)
            })
            .collect();
        let e = Geometry::from_slices(&named(tilted)).unwrap_err().0;
        assert!(e.contains("gantry tilt"), "{e}");

        let mut other = slice(2.0, AXIAL);
        other.rows = 5;
        let e = Geometry::from_slices(&named(vec![slice(0.0, AXIAL), other]))
            .unwrap_err()
            .0;
        assert!(e.contains("two grids"), "{e}");

        let e = Geometry::from_slices(&named(vec![slice(0.0, AXIAL)]))
            .unwrap_err()
            .0;
        assert!(e.contains("at least two"), "{e}");
    }
}
