#!/usr/bin/env bash
# TransSeg's ablation on the real brain-mask data: the same split, steps and
# seeds with the inflated pretrained ViT (centering and average), the same
# architecture from scratch, and the 2D ViT applied slice by slice.
# Writes docs/ablation/results.{md,png,json} and runs.md (per case and step);
# docs/ablation.md discusses them.
#
#   scripts/ablation.sh [--seeds 0,1] [--steps N] [--inits a,b,...]
# On 2 CPU cores each run (300 steps + 3 validations) takes ~10-12 min: the
# default 4 inits x 2 seeds about 1.5 h.
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
# Every run under the ablation folder (also those of earlier invocations),
# per held-out case and per validation step.
python3 scripts/ablation_table.py .cache/runs/ablation > docs/ablation/runs.md
echo "ablation done in $(( $(date +%s) - start )) s: docs/ablation/results.md, docs/ablation/runs.md"
