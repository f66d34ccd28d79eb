//! The voxel-to-world affine of a header (sform, qform or pixdim, in mm)
//! and the geometry fields written back into output headers.

use nalgebra::{Matrix3, Matrix4};
use nifti::{NiftiHeader, XForm};

/// Where the affine of a file came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AffineSource {
    Sform,
    Qform,
    Pixdim,
}

/// The voxel-to-world affine the NIfTI standard prescribes: sform when
/// `sform_code > 0`, else qform when `qform_code > 0`, else the ANALYZE
/// pixdim diagonal; converted to millimetres per `xyzt_units`. A degenerate
/// sform/qform falls through to the next method instead of producing a
/// singular affine.
pub(super) fn header_affine(h: &NiftiHeader) -> (Matrix4<f64>, AffineSource) {
    let (affine, source) = if h.sform_code > 0 && affine_is_valid(&sform_matrix(h)) {
        (sform_matrix(h), AffineSource::Sform)
    } else if h.qform_code > 0 && affine_is_valid(&qform_matrix(h)) {
        (qform_matrix(h), AffineSource::Qform)
    } else {
        let mut a = Matrix4::identity();
        for i in 0..3 {
            let p = f64::from(h.pixdim[i + 1]);
            a[(i, i)] = if p.is_finite() && p > 0.0 { p } else { 1.0 };
        }
        (a, AffineSource::Pixdim)
    };
    // The world frame of this runtime is millimetres; target spacings in
    // model manifests would be meaningless against metres or microns.
    let to_mm = match h.xyzt_units & 0o7 {
        1 => 1000.0,
        3 => 0.001,
        _ => 1.0,
    };
    if to_mm != 1.0 {
        let mut scaled = affine;
        for r in 0..3 {
            for c in 0..4 {
                scaled[(r, c)] *= to_mm;
            }
        }
        (scaled, source)
    } else {
        (affine, source)
    }
}

pub(super) fn sform_matrix(h: &NiftiHeader) -> Matrix4<f64> {
    let mut a = Matrix4::identity();
    for (r, row) in [h.srow_x, h.srow_y, h.srow_z].iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            a[(r, c)] = f64::from(*v);
        }
    }
    a
}

/// The qform affine exactly as nifti1_io's `quatern_to_mat44` computes it.
/// Written out here because the `nifti` crate's version panics on the
/// inputs an untrusted file can contain (negative pixdim, |bcd| > 1).
pub(super) fn qform_matrix(h: &NiftiHeader) -> Matrix4<f64> {
    let (mut b, mut c, mut d) = (
        f64::from(h.quatern_b),
        f64::from(h.quatern_c),
        f64::from(h.quatern_d),
    );
    let mut a = 1.0 - (b * b + c * c + d * d);
    if a < 1e-7 {
        // Not a unit quaternion: normalise (b, c, d) and treat it as a
        // 180-degree rotation, as nifti1_io does.
        let n = 1.0 / (b * b + c * c + d * d).sqrt();
        b *= n;
        c *= n;
        d *= n;
        a = 0.0;
    } else {
        a = a.sqrt();
    }
    let pix = |i: usize| {
        let p = f64::from(h.pixdim[i]);
        if p > 0.0 { p } else { 1.0 }
    };
    let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
    let r = Matrix3::new(
        a * a + b * b - c * c - d * d,
        2.0 * (b * c - a * d),
        2.0 * (b * d + a * c),
        2.0 * (b * c + a * d),
        a * a + c * c - b * b - d * d,
        2.0 * (c * d - a * b),
        2.0 * (b * d - a * c),
        2.0 * (c * d + a * b),
        a * a + d * d - c * c - b * b,
    );
    let zoom = Matrix3::from_diagonal(&nalgebra::Vector3::new(pix(1), pix(2), qfac * pix(3)));
    let m = r * zoom;
    let mut out = Matrix4::identity();
    out.fixed_view_mut::<3, 3>(0, 0).copy_from(&m);
    out[(0, 3)] = f64::from(h.quatern_x);
    out[(1, 3)] = f64::from(h.quatern_y);
    out[(2, 3)] = f64::from(h.quatern_z);
    out
}

/// Finite, last row (0, 0, 0, 1) and a linear part that is not (nearly)
/// singular relative to its scale.
pub(super) fn affine_is_valid(a: &Matrix4<f64>) -> bool {
    if a.iter().any(|v| !v.is_finite()) {
        return false;
    }
    if a[(3, 0)] != 0.0 || a[(3, 1)] != 0.0 || a[(3, 2)] != 0.0 || a[(3, 3)] != 1.0 {
        return false;
    }
    let lin = a.fixed_view::<3, 3>(0, 0);
    let norms: f64 = (0..3).map(|c| lin.column(c).norm()).product();
    norms > 0.0 && lin.determinant().abs() > 1e-6 * norms
}

pub(super) fn header_matches_grid(
    h: &NiftiHeader,
    dims: [usize; 3],
    affine: &Matrix4<f64>,
) -> bool {
    let rank = h.dim[0] as usize;
    let hdims: Vec<usize> = (1..=3)
        .map(|i| if i <= rank { h.dim[i] as usize } else { 1 })
        .collect();
    if hdims != dims {
        return false;
    }
    let (ha, _) = header_affine(h);
    let scale = affine.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    (ha - affine).iter().all(|d| d.abs() <= 1e-5 * scale)
}

pub(super) fn copy_geometry(src: &NiftiHeader, dst: &mut NiftiHeader) {
    dst.pixdim = src.pixdim;
    dst.qform_code = src.qform_code;
    dst.sform_code = src.sform_code;
    dst.quatern_b = src.quatern_b;
    dst.quatern_c = src.quatern_c;
    dst.quatern_d = src.quatern_d;
    dst.quatern_x = src.quatern_x;
    dst.quatern_y = src.quatern_y;
    dst.quatern_z = src.quatern_z;
    dst.srow_x = src.srow_x;
    dst.srow_y = src.srow_y;
    dst.srow_z = src.srow_z;
    dst.xyzt_units = src.xyzt_units;
    dst.dim_info = src.dim_info;
}

/// sform from the affine (code "aligned"), and a qform too when the affine
/// is a rotation plus zooms (so qform-preferring tools agree); units mm.
pub(super) fn set_geometry_from_affine(h: &mut NiftiHeader, affine: &Matrix4<f64>) {
    h.set_sform(affine, XForm::AlignedAnat);
    h.set_qform(affine, XForm::AlignedAnat);
    let q = qform_matrix(h);
    let scale = affine.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    if (q - affine).iter().any(|d| d.abs() > 1e-4 * scale) {
        h.qform_code = XForm::Unknown as i16;
    }
    h.xyzt_units = (h.xyzt_units & 0o70) | 2;
}
