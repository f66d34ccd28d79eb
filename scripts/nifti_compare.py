#!/usr/bin/env python3
"""Compares two NIfTI-1 volumes on the same grid, with the Python standard
library only (gpu-check.sh runs on machines that may have nothing else):

    nifti_compare.py A.nii.gz B.nii.gz

prints one JSON object: voxels, the fraction of voxels that are equal, the
largest |A - B|, and whether the two headers put the grid at the same place
(dims and sform/qform affine within 1e-4). Exit 0 when both files could be
read and share a grid, 2 otherwise (the message says why)."""
import gzip
import json
import struct
import sys
from array import array

# NIfTI-1 datatype codes this reads, with their struct/array type codes.
TYPES = {2: "B", 4: "h", 8: "i", 16: "f", 64: "d", 256: "b", 512: "H", 768: "I"}


def fail(msg):
    print(f"nifti_compare: {msg}", file=sys.stderr)
    sys.exit(2)


def read(path):
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except OSError as e:
        fail(f"{path}: {e}")
    if len(raw) < 352:
        fail(f"{path}: shorter than a NIfTI-1 header")
    endian = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    if struct.unpack(endian + "i", raw[:4])[0] != 348:
        fail(f"{path}: not a NIfTI-1 file")
    dim = struct.unpack(endian + "8h", raw[40:56])
    datatype = struct.unpack(endian + "h", raw[70:72])[0]
    vox_offset = int(struct.unpack(endian + "f", raw[108:112])[0])
    slope, inter = struct.unpack(endian + "2f", raw[112:120])
    sform_code = struct.unpack(endian + "h", raw[254:256])[0]
    srow = struct.unpack(endian + "12f", raw[280:328])
    pixdim = struct.unpack(endian + "8f", raw[76:108])
    if datatype not in TYPES:
        fail(f"{path}: datatype {datatype} not supported here")
    n = 1
    for d in dim[1 : dim[0] + 1]:
        n *= max(d, 1)
    data = array(TYPES[datatype])
    size = data.itemsize * n
    if len(raw) < vox_offset + size:
        fail(f"{path}: truncated voxel data")
    data.frombytes(raw[vox_offset : vox_offset + size])
    if (endian == ">") != (sys.byteorder == "big"):
        data.byteswap()
    values = list(data)
    if slope not in (0.0, 1.0) or inter != 0.0:
        s = slope or 1.0
        values = [v * s + inter for v in values]
    affine = srow if sform_code > 0 else tuple(pixdim[1:4])
    return tuple(dim[1 : dim[0] + 1]), affine, values


def main():
    if len(sys.argv) != 3:
        fail("usage: nifti_compare.py A.nii[.gz] B.nii[.gz]")
    (da, aa, va), (db, ab, vb) = read(sys.argv[1]), read(sys.argv[2])
    if da != db:
        fail(f"the grids differ: dims {da} and {db}")
    same_grid = all(abs(x - y) <= 1e-4 for x, y in zip(aa, ab))
    equal = sum(1 for x, y in zip(va, vb) if x == y)
    diff = max((abs(x - y) for x, y in zip(va, vb)), default=0.0)
    print(json.dumps({
        "voxels": len(va),
        "equal_fraction": equal / len(va) if va else 1.0,
        "max_abs_diff": diff,
        "same_grid": same_grid,
    }))
    sys.exit(0 if same_grid else 2)


if __name__ == "__main__":
    main()
