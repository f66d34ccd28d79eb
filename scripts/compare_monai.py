#!/usr/bin/env python3
"""infl8 against MONAI on real scans; run by scripts/compare-monai.sh, which
builds the pinned venv and infl8 and produces the infl8 side.

resample   MONAI's Orientation("RAS") + Spacing(pixdim, mode="bilinear")
           against infl8's preprocessing (the `resample` example's output):
           shape, affine and values.
pipeline   MONAI's LoadImaged, EnsureChannelFirstd, Orientationd("RAS"),
           Spacingd(bilinear), ScaleIntensityRangePercentilesd(1, 99, 0, 1,
           clip), sliding_window_inference (gaussian) with the model run by
           ONNX Runtime, then Invertd (bilinear) and argmax, against
           `infl8 segment --save-logits` with the same model: the logits on
           the input grid and the labels.

Prints one line per comparison, with what was compared and the numbers, and
exits 1 if any is outside its tolerance.
"""

import argparse
import sys

import nibabel as nib
import numpy as np
import onnxruntime as ort
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    Invertd,
    LoadImage,
    LoadImaged,
    Orientation,
    Orientationd,
    ScaleIntensityRangePercentilesd,
    Spacing,
    Spacingd,
)

AFFINE_TOL = 1e-4  # infl8 writes the affine as NIfTI's f32 sform
VALUE_RTOL = 1e-5  # of the largest |value|: MONAI resamples in f64, infl8 in f64 per pass, f32 between
LOGITS_TOL = 1e-3
LABELS_MIN = 0.999


def report(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    return ok


def resample(args):
    img = LoadImage(image_only=True, ensure_channel_first=True)(args.scan)
    img = Orientation(axcodes="RAS")(img)
    img = Spacing(pixdim=args.pixdim, mode="bilinear")(img)
    want = img[0].numpy()
    want_affine = img.affine.numpy()
    ours = nib.load(args.infl8)
    got = np.asarray(ours.get_fdata(dtype=np.float32))
    name = f"{args.scan} to {args.pixdim} mm"
    ok = report(
        got.shape == want.shape,
        f"resample {name}: shape infl8 {got.shape}, MONAI {want.shape}",
    )
    if not ok:
        return False
    da = float(np.abs(ours.affine - want_affine).max())
    ok &= report(da <= AFFINE_TOL, f"resample {name}: affine max abs diff {da:.3g}")
    scale = max(1.0, float(np.abs(want).max()))
    dv = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    ok &= report(
        dv <= VALUE_RTOL * scale,
        f"resample {name}: values max abs diff {dv:.3g} (largest |value| {scale:.4g})",
    )
    return ok


def pipeline(args):
    pre = Compose(
        [
            LoadImaged("image"),
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes="RAS"),
            Spacingd("image", pixdim=args.pixdim, mode="bilinear"),
            ScaleIntensityRangePercentilesd(
                "image", lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True
            ),
        ]
    )
    d = pre({"image": args.scan})
    image = d["image"]
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def predictor(x):
        y = session.run(None, {input_name: x.detach().cpu().numpy().astype(np.float32)})[0]
        return torch.from_numpy(y)

    with torch.no_grad():
        pred = sliding_window_inference(
            image.as_tensor().unsqueeze(0),
            roi_size=args.roi,
            sw_batch_size=4,
            predictor=predictor,
            overlap=args.overlap,
            mode="gaussian",
        )[0]
    # The prediction lives on the image's (resampled) grid and inherits its
    # transform history, which Invertd walks back.
    d["pred"] = MetaTensor(pred, affine=image.affine, meta=dict(image.meta))
    d["pred"].applied_operations = image.applied_operations
    d = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)(d)
    want = d["pred"].numpy()
    want_labels = np.argmax(want, axis=0)

    got = np.asarray(nib.load(args.logits).get_fdata(dtype=np.float32))
    got = got.reshape(got.shape[:3] + (-1,))  # [X, Y, Z, 1, K] or [X, Y, Z, K]
    got = np.moveaxis(got, -1, 0)
    labels = np.asarray(nib.load(args.labels).dataobj).astype(np.int64)
    name = f"{args.scan} at {args.pixdim} mm, {args.model}"
    ok = report(
        got.shape == want.shape and labels.shape == want_labels.shape,
        f"pipeline {name}: logits shape infl8 {got.shape}, MONAI {want.shape}",
    )
    if not ok:
        return False
    dl = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    ok &= report(
        dl <= LOGITS_TOL,
        f"pipeline {name}: logits on the input grid, max abs diff {dl:.3g} "
        f"(range {float(want.min()):.3g} .. {float(want.max()):.3g})",
    )
    agree = float((labels == want_labels).mean())
    ok &= report(
        agree >= LABELS_MIN,
        f"pipeline {name}: labels agree on {100 * agree:.4f} % of {labels.size} voxels "
        f"({int((labels != want_labels).sum())} differ; foreground {int((want_labels > 0).sum())})",
    )
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="stage", required=True)
    r = sub.add_parser("resample")
    r.add_argument("--scan", required=True)
    r.add_argument("--infl8", required=True, help="infl8's resampled volume")
    r.add_argument("--pixdim", type=float, nargs=3, required=True)
    q = sub.add_parser("pipeline")
    q.add_argument("--scan", required=True)
    q.add_argument("--model", required=True)
    q.add_argument("--logits", required=True, help="infl8 segment --save-logits output")
    q.add_argument("--labels", required=True, help="infl8 segment --output")
    q.add_argument("--pixdim", type=float, nargs=3, required=True)
    q.add_argument("--roi", type=int, nargs=3, required=True)
    q.add_argument("--overlap", type=float, required=True)
    args = p.parse_args()
    ok = resample(args) if args.stage == "resample" else pipeline(args)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
