#!/usr/bin/env bash
# TransSeg's ablation on the real brain-mask data: the same split, steps and
# seeds with the inflated pretrained ViT (centering and average), the same
# architecture from scratch, and the 2D ViT applied slice by slice.
# Writes docs/ablation/results.{md,png,json}; docs/ablation.md discusses them.
#
#   scripts/ablation.sh [--seeds 0,1] [--steps N] [--inits a,b,...]
# On 2 CPU cores the default (4 inits x 2 seeds x 300 steps) takes ~45 min.
set -euo pipefail
cd "$(dirname "$0")/.."

seeds=0,1
steps=""
inits=inflated,inflated-average,scratch,2d
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) seeds="$2"; shift 2 ;;
    --steps) steps="--steps $2"; shift 2 ;;
    --inits) inits="$2"; shift 2 ;;
    *) echo "usage: $0 [--seeds LIST] [--steps N] [--inits LIST]" >&2; exit 2 ;;
  esac
done

./scripts/fetch-data.sh --vit
./scripts/fetch-train-data.sh
cargo build --release -p infl8-trainer -p infl8-cli -p infl8-plugin-tract
mkdir -p docs/ablation
start=$(date +%s)
# shellcheck disable=SC2086
./target/release/infl8-train ablate --config trainer/configs/brain-mask-ablation.toml \
  --inits "$inits" --seeds "$seeds" $steps --report docs/ablation/results.md
echo "ablation done in $(( $(date +%s) - start )) s: docs/ablation/results.md"
