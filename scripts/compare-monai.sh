#!/usr/bin/env bash
# Compares infl8 with MONAI 1.6.1 on real scans (scripts/fetch-train-data.sh
# puts them in .cache/train-data/brain/), and says what it compared:
#   resample  MONAI's Orientation("RAS") + Spacing(pixdim, bilinear) against
#             infl8's preprocessing (the `resample` example): shape, affine,
#             values (max abs diff);
#   pipeline  MONAI's Orientationd + Spacingd + percentile window +
#             sliding_window_inference (model run by ONNX Runtime) + Invertd +
#             argmax against `infl8 segment --save-logits` with the same model
#             (`infl8 example-model`, a sliding-window model): logits on the
#             input grid (max abs diff <= 1e-3) and labels (>= 99.9 % agree).
# Exits non-zero if any comparison is outside its tolerance.
#
# A developer tool, not part of CI: the evaluation-only venv it builds in
# .cache/venv-monai holds PyTorch from PyPI, whose Linux wheel brings the CUDA
# libraries (about 4 GB; PyPI has no CPU-only torch). Only PyPI is contacted.
#
# usage: scripts/compare-monai.sh [--debug] [--doc] [SCAN.nii.gz ...]
#   --debug   use the debug build of infl8 (default: release)
#   --doc     also write the comparisons to docs/monai-parity.md
set -euo pipefail
shopt -s inherit_errexit

root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.cache/venv-monai"
# Pinned: the versions the resampling fixtures (tests/fixtures/resample) and
# sliding-window fixtures were made with, and the ONNX Runtime of fetch-ort.sh.
pins=(monai==1.6.1 torch==2.15.0 numpy==2.4.6 nibabel==5.4.2 onnxruntime==1.24.4)
python=${PYTHON:-python3}

profile=release
doc=0
scans=()
for arg in "$@"; do
  case "$arg" in
    --debug) profile=debug ;;
    --doc) doc=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "compare-monai: unknown option $arg (try --help)" >&2; exit 2 ;;
    *) scans+=("$arg") ;;
  esac
done
brain="$root/.cache/train-data/brain"
if [ ${#scans[@]} -eq 0 ]; then
  # An anisotropic 2 x 2 x 3 mm scan stored LSA-like, and a 1 mm one.
  scans=("$brain/itk-t1_image.nii.gz" "$brain/colin27_image.nii.gz")
fi
for s in "${scans[@]}"; do
  [ -f "$s" ] || { echo "compare-monai: $s is missing (run scripts/fetch-train-data.sh)" >&2; exit 1; }
done

if ! "$venv/bin/python" -c 'import monai, torch, nibabel, onnxruntime' 2>/dev/null; then
  echo "compare-monai: building $venv (${pins[*]})" >&2
  rm -rf "$venv.tmp"
  "$python" -m venv "$venv.tmp"
  "$venv.tmp/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}"
  # Built beside and moved into place, so an interrupted install never
  # looks finished (only bin/python is used, which works after the move).
  rm -rf "$venv"
  mv "$venv.tmp" "$venv"
fi
py="$venv/bin/python"

if [ "$profile" = release ]; then
  (cd "$root" && cargo build --locked --release -p infl8-cli -p infl8-plugin-tract \
    && cargo build --locked --release -p infl8-suite --example resample) >&2
else
  # The test suite's own build (the same feature set: nothing is rebuilt).
  (cd "$root" && cargo build --locked --workspace --all-targets) >&2
fi
bin="$root/target/$profile"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
roi=(48 48 48)
"$bin/infl8" example-model --out "$work/model.onnx" --roi "${roi[@]}" >&2

failed=0
results="$work/results.txt"
for scan in "${scans[@]}"; do
  name=$(basename "$scan" .nii.gz)
  # The issue's CT target (1.5 x 1.5 x 2 mm) and the example model's 2 mm.
  for pixdim in "1.5 1.5 2" "2 2 2"; do
    read -r -a p <<<"$pixdim"
    out="$work/$name-${p[0]}-${p[1]}-${p[2]}.nii.gz"
    "$bin/examples/resample" "$scan" "$out" "${p[@]}" >&2
    "$py" "$root/scripts/compare_monai.py" resample --scan "$scan" --infl8 "$out" \
      --pixdim "${p[@]}" | tee -a "$results" || failed=1
    labels="$work/$name-${p[0]}-${p[1]}-${p[2]}-labels.nii.gz"
    logits="$work/$name-${p[0]}-${p[1]}-${p[2]}-logits.nii.gz"
    "$bin/infl8" segment --model "$work/model.onnx" --input "$scan" --output "$labels" \
      --save-logits "$logits" --spacing "${p[@]}" --no-model-postprocess >&2
    "$py" "$root/scripts/compare_monai.py" pipeline --scan "$scan" --model "$work/model.onnx" \
      --logits "$logits" --labels "$labels" --pixdim "${p[@]}" --roi "${roi[@]}" \
      --overlap 0.25 | tee -a "$results" || failed=1
  done
done
if [ "$doc" = 1 ]; then
  versions=$("$py" -c 'import monai, torch, onnxruntime; print(f"MONAI {monai.__version__}, torch {torch.__version__}, ONNX Runtime {onnxruntime.__version__}")')
  {
    echo "# MONAI parity on real scans"
    echo
    echo "Written by \`scripts/compare-monai.sh --doc\` on $(date -u +%Y-%m-%d) ($versions in the script's venv; infl8's $profile build, $(uname -m)). Each scan is resampled to 1.5x1.5x2 mm and to 2 mm: \`resample\` compares MONAI's \`Orientation(\"RAS\")\` + \`Spacing\` with infl8's preprocessing, \`pipeline\` the whole chain (the example model, a ${roi[0]}^3 roi, overlap 0.25) up to labels on the input grid (\`Invertd\`). Rerun the script to refresh this page."
    echo
    echo '```'
    sed "s#$root/##g; s#$work/##g" "$results"
    echo '```'
  } > "$root/docs/monai-parity.md"
  echo "compare-monai: wrote docs/monai-parity.md" >&2
fi
if [ "$failed" -ne 0 ]; then
  echo "compare-monai: infl8 and MONAI differ (see FAIL above)" >&2
  exit 1
fi
echo "compare-monai: infl8 matches MONAI on every comparison above"
