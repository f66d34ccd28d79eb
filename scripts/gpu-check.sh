#!/usr/bin/env bash
# Proves infl8's GPU paths on any Linux machine with an NVIDIA GPU and
# driver, in one run, from a bundle of prebuilt files: nothing is built or
# downloaded there, and the bundle stays under 64 MiB (what a GPU test
# machine takes with a call).
#
#   scripts/gpu-check.sh bundle [DIR]            # here: build in release, pack DIR
#   scripts/gpu-check.sh run [DIR] [--out FILE]  # there: run the checks, write the report
#
# `bundle` (default DIR .cache/gpu-bundle) holds: infl8 and the tract plugin
# (backends tract and tract-cuda), stripped; the shipped brain-mask model;
# a volumetric model made by the trainer (inflated ViT-S blocks, a 98x98x96
# window: UNETR-sized, so the GPU has real work); two real
# volumes (Colin27, the ITK subject); this script and nifti_compare.py;
# and, with --trainer, infl8-train built with `--features cuda` plus a
# small training config, so the GPU trains too (that build downloads an
# LLVM bundle from GitHub, which works only where the network allows it:
# docs/trainer.md). GPU_CHECK_ORT=DIR adds an
# ONNX Runtime GPU library if one fits (it usually does not: ~250 MB).
#
# `run` (default DIR: the folder this script is in) writes a Markdown
# report to FILE (default $OUT/gpu-report.md when $OUT is set, else
# ./gpu-report.md):
#   - the GPU, driver and CUDA version (nvidia-smi);
#   - `infl8 plugin check` on tract-cuda (--require-all: skipping is failing);
#   - `infl8 segment` of each volume with each model on tract and on
#     tract-cuda: labels must agree on >= 99.9 % of voxels and logits within
#     1e-3; seconds per volume and per window, and the GPU memory peak;
#   - with infl8-train in the bundle: 20 fine-tuning steps on the GPU
#     (`--device cuda`) and on the CPU (`--device flex`) from the same seed,
#     losses side by side;
#   - ort-cuda / ort-tensorrt only where an ONNX Runtime GPU library is in the
#     bundle or in ORT_DYLIB_PATH; otherwise it says so and skips them.
# Exit status: 0 every check passed, 1 a check failed (the report says
# which), 2 usage or a broken bundle, 3 no NVIDIA GPU here (the report says
# why; nothing ran). On a machine without a GPU `run` exits 3 before it
# looks at the bundle, which is how CI tests this script.
set -euo pipefail

die() { echo "gpu-check: ERROR: $*" >&2; exit 2; }
say() { echo "gpu-check: $*" >&2; }
NO_GPU=3
MAX_BUNDLE=$((64 * 1024 * 1024))

cmd=${1:-}
[ -n "$cmd" ] || die "usage: $0 bundle [DIR] [--trainer] | run [DIR] [--out FILE]"
shift

# ------------------------------------------------------------------ bundle
if [ "$cmd" = bundle ]; then
  root=$(cd "$(dirname "$0")/.." && pwd)
  dir=$root/.cache/gpu-bundle
  trainer=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --trainer) trainer=1; shift ;;
      -*) die "unknown option $1" ;;
      *) dir=$1; shift ;;
    esac
  done
  cd "$root"
  ./scripts/fetch-train-data.sh >&2
  ./scripts/fetch-data.sh --vit >&2
  cargo build --release --locked -p infl8-cli -p infl8-plugin-tract -p infl8-trainer >&2
  rm -rf "$dir" && mkdir -p "$dir/bin" "$dir/models" "$dir/volumes"
  cp target/release/infl8 target/release/libinfl8_tract.so "$dir/bin/"
  strip "$dir/bin/"* 2>/dev/null || true
  cp models/brain-mask.onnx "$dir/models/"
  # The volumetric model: 4 inflated blocks of the pretrained ViT-S/14,
  # 98x98x96 windows (7x7 patches of 14 in-plane, 6 of 16 deep), exported
  # (and checked against tract) by the trainer.
  T=target/release/infl8-train
  $T inflate --vit .cache/models/vit_s_focus.onnx --out "$dir/vol.safetensors" \
    --shape volumetric --roi 98 98 --tile-depth 96 --patch-depth 16 --blocks 4 >&2
  $T export --checkpoint "$dir/vol.safetensors" --out "$dir/models/volumetric-96.onnx" \
    --zscore --spacing 1.5 1.5 1.5 --name gpu-check-volumetric >&2
  rm -f "$dir/vol.safetensors"
  cp .cache/train-data/brain/colin27_image.nii.gz .cache/train-data/brain/itk-t1_image.nii.gz \
    "$dir/volumes/"
  if [ "$trainer" = 1 ]; then
    work_vit=$dir/vit-full.safetensors
    cargo build --release --locked -p infl8-trainer --features cuda \
      --target-dir target/gpu-trainer >&2
    cp target/gpu-trainer/release/infl8-train "$dir/bin/"
    strip "$dir/bin/infl8-train" 2>/dev/null || true
    mkdir -p "$dir/train/data"
    cp .cache/train-data/brain/itk-t1_{image,label}.nii.gz .cache/train-data/brain/labels.json \
      "$dir/train/data/"
    # The default model starts from the ViT's first 3 blocks; the whole
    # ViT (88 MB) would not fit, so its canonical safetensors loses the rest.
    $T import .cache/models/vit_s_focus.onnx --out "$work_vit" >&2
    python3 - "$work_vit" "$dir/train/vit3.safetensors" 3 <<'PY'
import json, re, struct, sys
src, dst, keep = sys.argv[1], sys.argv[2], int(sys.argv[3])
raw = open(src, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
body = raw[8 + n:]
meta = header.pop("__metadata__", None)
out, chunks, offset = {}, [], 0
for name, t in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
    m = re.search(r"blocks\.(\d+)\.", name)
    if m and int(m.group(1)) >= keep:
        continue
    a, b = t["data_offsets"]
    chunks.append(body[a:b])
    out[name] = dict(t, data_offsets=[offset, offset + b - a])
    offset += b - a
if meta is not None:
    out["__metadata__"] = meta
text = json.dumps(out).encode()
text += b" " * (-len(text) % 8)
with open(dst, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))
PY
    rm -f "$work_vit"
    sed -e 's#^dir = .*#dir = "data"#' -e 's#^vit = .*#vit = "vit3.safetensors"#' \
      -e 's#^validation_cases = .*#validation_cases = []#' \
      -e 's#^held_out_cases = .*#held_out_cases = []#' \
      -e 's#^per_case = .*#per_case = 0#' \
      -e 's#^out = .*#out = "run"#' trainer/configs/brain-mask.toml > "$dir/train/config.toml"
  fi
  if [ -n "${GPU_CHECK_ORT:-}" ]; then
    cp "$GPU_CHECK_ORT"/libonnxruntime*.so* "$dir/bin/" && cp target/release/libinfl8_ort.so "$dir/bin/"
  fi
  cp scripts/gpu-check.sh scripts/nifti_compare.py "$dir/"
  size=$(du -sb "$dir" | cut -f1)
  say "bundle $dir: $((size / 1024 / 1024)) MiB"
  [ "$size" -le "$MAX_BUNDLE" ] || die "the bundle is $((size / 1024 / 1024)) MiB, over 64 MiB"
  exit 0
fi

[ "$cmd" = run ] || die "unknown command $cmd (bundle or run)"

# --------------------------------------------------------------------- run
dir=$(dirname "$0")
report=${OUT:+$OUT/gpu-report.md}
report=${report:-$PWD/gpu-report.md}
while [ $# -gt 0 ]; do
  case "$1" in
    --out) report=$2; shift 2 ;;
    -*) die "unknown option $1" ;;
    *) dir=$1; shift ;;
  esac
done
mkdir -p "$(dirname "$report")"

# The GPU first: without one there is nothing to prove, and that is not a
# failure of infl8's, so it gets its own exit status.
why=""
if ! command -v nvidia-smi >/dev/null 2>&1; then
  why="nvidia-smi is not installed (no NVIDIA driver)"
elif ! gpus=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1); then
  why="nvidia-smi fails: $(echo "$gpus" | head -1)"
elif [ -z "$gpus" ]; then
  why="nvidia-smi lists no GPU"
fi
if [ -n "$why" ]; then
  { echo "# infl8 GPU check"; echo; echo "no NVIDIA GPU: $why. Nothing was run."; } > "$report"
  say "no NVIDIA GPU: $why (report: $report)"
  exit $NO_GPU
fi

dir=$(cd "$dir" 2>/dev/null && pwd) || die "no bundle folder $dir"
bin=$dir/bin
[ -x "$bin/infl8" ] && [ -f "$bin/libinfl8_tract.so" ] ||
  die "$dir is not a bundle (no bin/infl8, bin/libinfl8_tract.so): make one with '$0 bundle'"
export INFL8_PLUGIN_DIR=$bin
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0
lines=()
add() { lines+=("$*"); }
fail() { failed=1; add "- **FAILED**: $*"; }

cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1)
add "# infl8 GPU check"
add ""
add "- machine: $(uname -srm), $(nproc) CPU cores"
add "- GPU: $gpus; CUDA (driver API) ${cuda:-?}"
add "- bundle: $dir ($(du -sh "$dir" | cut -f1))"
add "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
add ""

# GPU memory peak of a command: nvidia-smi sampled every 200 ms.
mem_peak() {
  local log=$work/mem.log
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$log" 2>/dev/null &
  local sampler=$!
  local status=0
  "$@" || status=$?
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
  peak=$(sort -n "$log" | tail -1)
  return $status
}

add "## Conformance: \`infl8 plugin check\` on tract-cuda"
add ""
if "$bin/infl8" plugin check "$bin/libinfl8_tract.so" --backend tract-cuda --require-all \
    --tolerance 1e-3 --json "$work/check.json" > "$work/check.txt" 2>&1; then
  add "passed: $(grep -c '^ *ok' "$work/check.txt" || true) checks"
else
  fail "plugin check on tract-cuda"
  add '```'; while IFS= read -r l; do add "$l"; done < <(tail -25 "$work/check.txt"); add '```'
fi
add ""

add "## Segmentation: tract (CPU) against tract-cuda (GPU)"
add ""
add "| model | volume | backend | s per volume | windows | s per window | GPU memory peak (MiB) | labels equal | max logit diff |"
add "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
json_get() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d=d[0] if isinstance(d,list) else d; print(d.get(sys.argv[2], ""))' "$1" "$2"; }
for model in "$dir"/models/*.onnx; do
  m=$(basename "$model" .onnx)
  for vol in "$dir"/volumes/*.nii.gz; do
    v=$(basename "$vol" .nii.gz)
    for b in tract tract-cuda; do
      out=$work/$m.$v.$b
      t0=$(date +%s.%N)
      if mem_peak "$bin/infl8" segment --backend "$b" --model "$model" --input "$vol" \
          --output "$out.nii.gz" --save-logits "$out.logits.nii.gz" --report "$out.json" \
          --isolation off > "$out.log" 2>&1; then
        t1=$(date +%s.%N)
        secs=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
        windows=$(json_get "$out.json" windows)
        infer=$(json_get "$out.json" infer_s)
        per=$(python3 -c "w='$windows'; i='$infer'; print(f'{float(i)/int(w):.4f}' if w and i else '?')")
        if [ "$b" = tract-cuda ]; then
          cmp=$(python3 "$dir/nifti_compare.py" "$work/$m.$v.tract.nii.gz" "$out.nii.gz") || cmp='{}'
          lcmp=$(python3 "$dir/nifti_compare.py" "$work/$m.$v.tract.logits.nii.gz" "$out.logits.nii.gz") || lcmp='{}'
          eq=$(echo "$cmp" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("equal_fraction", -1))')
          ld=$(echo "$lcmp" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("max_abs_diff", 1e9))')
          python3 -c "import sys; sys.exit(0 if $eq >= 0.999 and $ld <= 1e-3 else 1)" ||
            fail "$m on $v: tract-cuda labels equal on $eq of voxels, logits within $ld (need 0.999 and 1e-3)"
          add "| $m | $v | $b | $secs | $windows | $per | $peak | $(python3 -c "print(f'{100*$eq:.3f} %')") | $ld |"
        else
          add "| $m | $v | $b | $secs | $windows | $per | – | – | – |"
        fi
      else
        fail "$m on $v with $b: $(tail -1 "$out.log")"
      fi
    done
  done
done
add ""

add "## Training on the GPU (infl8-train --features cuda)"
add ""
if [ -x "$bin/infl8-train" ] && [ -f "$dir/train/config.toml" ]; then
  for device in cuda flex; do
    # finetune takes its device from the config (train.device).
    sed "s/^device = .*/device = \"$device\"/" "$dir/train/config.toml" > "$dir/train/config-$device.toml"
    rm -rf "$dir/train/run-$device"
    (cd "$dir/train" && "$bin/infl8-train" finetune --config "config-$device.toml" \
      --steps 20 --out "run-$device" > "$work/train-$device.log" 2>&1) ||
      fail "20 training steps on $device: $(tail -1 "$work/train-$device.log")"
  done
  add "| step | loss (cuda) | loss (CPU, flex) |"
  add "| --- | --- | --- |"
  while IFS= read -r l; do add "$l"; done < <(python3 - "$dir/train/run-cuda/metrics.csv" "$dir/train/run-flex/metrics.csv" <<'PY'
import csv, sys
def rows(p):
    try:
        return {r["step"]: r["loss"] for r in csv.DictReader(open(p))}
    except OSError:
        return {}
a, b = rows(sys.argv[1]), rows(sys.argv[2])
for s in sorted(set(a) | set(b), key=int):
    if int(s) in (1, 2, 5, 10, 20):
        print(f"| {s} | {a.get(s, '?')} | {b.get(s, '?')} |")
PY
  )
else
  add "not run: the bundle has no infl8-train built with \`--features cuda\` (make it with \`$0 bundle --trainer\`)."
fi
add ""

add "## ONNX Runtime GPU backends"
add ""
if ls "$bin"/libonnxruntime*.so* >/dev/null 2>&1 || [ -n "${ORT_DYLIB_PATH:-}" ]; then
  for b in ort-cuda ort-tensorrt; do
    "$bin/infl8" plugin check "$bin/libinfl8_ort.so" --backend "$b" --require-all \
      --tolerance 1e-3 > "$work/$b.txt" 2>&1 && add "- $b: plugin check passed" ||
      fail "$b: $(tail -1 "$work/$b.txt")"
  done
else
  add "skipped: no ONNX Runtime GPU library in the bundle or in ORT_DYLIB_PATH."
fi
add ""
add "Result: $([ $failed = 0 ] && echo "every check passed" || echo "**some checks failed**")."

printf '%s\n' "${lines[@]}" > "$report"
say "report: $report"
exit $failed
