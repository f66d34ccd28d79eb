#!/usr/bin/env bash
# Checks scripts/gpu-check.sh where it runs in CI, on a machine without a
# GPU: `run` reports "no NVIDIA GPU" with its own exit status (3) and a
# report, before it looks at the bundle. On a machine with a working
# nvidia-smi it must instead refuse an empty folder as a bundle (status 2).
# Also checks scripts/nifti_compare.py on two real label maps.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
OUT=$work/out "$root/scripts/gpu-check.sh" run "$work/empty" > "$work/log" 2>&1 || status=$?
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  [ "$status" = 2 ] || { echo "gpu-check: with a GPU, an empty bundle must exit 2, got $status" >&2; cat "$work/log" >&2; exit 1; }
else
  [ "$status" = 3 ] || { echo "gpu-check: without a GPU, run must exit 3, got $status" >&2; cat "$work/log" >&2; exit 1; }
  grep -q "^no NVIDIA GPU: " "$work/out/gpu-report.md" ||
    { echo "gpu-check: the report does not say there is no GPU" >&2; cat "$work/out/gpu-report.md" >&2; exit 1; }
fi
# nifti_compare: a real label map against itself and against another grid.
data=$root/.cache/train-data/brain
same=$(python3 "$root/scripts/nifti_compare.py" "$data/itk-t1_label.nii.gz" "$data/itk-t1_label.nii.gz")
python3 -c 'import json,sys; d=json.loads(sys.argv[1]); assert d["equal_fraction"] == 1.0 and d["max_abs_diff"] == 0 and d["same_grid"], d' "$same"
if python3 "$root/scripts/nifti_compare.py" "$data/itk-t1_label.nii.gz" "$data/colin27_label.nii.gz" 2>/dev/null; then
  echo "nifti_compare: two grids of different dims compared as one" >&2; exit 1
fi
echo "gpu-check: ok (no-GPU path and nifti_compare)"
