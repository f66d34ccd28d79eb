#!/usr/bin/env bash
# Checks that what scripts/fetch-ort.sh installs is found by the ort plugin
# with no setting: the script runs with its cache and the per-user data
# folder in a scratch folder (the cache seeded from .cache/onnxruntime/cpu, so
# nothing is downloaded), then `infl8 segment --backend ort-cpu` runs with
# ORT_DYLIB_PATH unset and its labels must equal tract's.
# Needs target/debug/infl8 and the plugins (cargo build --workspace) and
# scripts/fetch-ort.sh run once (.cache/onnxruntime/cpu).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="${CARGO_TARGET_DIR:-$root/target}/debug"
fail() { echo "fetch-ort-install: FAIL: $*" >&2; exit 1; }
[ -x "$bin/infl8" ] && [ -f "$bin/libinfl8_ort.so" ] || fail "build first: cargo build --workspace"
cpu="$root/.cache/onnxruntime/cpu"
[ -f "$cpu/.complete" ] || fail "$cpu is missing: run scripts/fetch-ort.sh first"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The versioned folder fetch-ort.sh keeps for the pinned CPU wheel.
sum=$(awk '{ print $3 }' "$cpu/.complete")
version=$(awk '{ print $2 }' "$cpu/.complete")
mkdir -p "$work/cache"
cp -a "$(readlink -f "$cpu")" "$work/cache/cpu-$version-${sum:0:12}"

lib=$(env -u ORT_DYLIB_PATH ORT_FETCH_CACHE="$work/cache" XDG_DATA_HOME="$work/data" \
  "$root/scripts/fetch-ort.sh")
[ "$lib" = "$work/data/infl8/onnxruntime/libonnxruntime.so" ] || fail "installed at $lib"
[ -f "$lib" ] || fail "$lib is not there"
[ -L "$work/data/infl8/onnxruntime" ] || fail "the install is not an atomic symlink"
echo "ok: fetch-ort.sh installed $lib"

# The caller's INFL8_* settings are dropped: only this test configures infl8.
unset_settings=()
for v in $(compgen -e | grep '^INFL8_' || true); do unset_settings+=(-u "$v"); done
infl8() {
  env "${unset_settings[@]}" -u ORT_DYLIB_PATH XDG_DATA_HOME="$work/data" HOME="$work" INFL8_PLUGIN_DIRS="$bin" \
    RUST_LOG=warn "$bin/infl8" "$@"
}
infl8 example-model --out "$work/m.onnx" --roi 32 32 32 >/dev/null
input="$root/.cache/data/mni152/tpl-MNI152NLin6Asym_res-02_T1w.nii.gz"
[ -f "$input" ] || fail "$input is missing: run scripts/fetch-data.sh"
infl8 segment --model "$work/m.onnx" --input "$input" --output "$work/ort.nii.gz" --backend ort-cpu ||
  fail "infl8 segment --backend ort-cpu failed without ORT_DYLIB_PATH"
infl8 segment --model "$work/m.onnx" --input "$input" --output "$work/tract.nii.gz" --backend tract
cmp -s <(gzip -dc "$work/ort.nii.gz") <(gzip -dc "$work/tract.nii.gz") ||
  fail "ort-cpu and tract label maps differ"
infl8 plugins | grep -E '^ort-cpu +[^ ]+ +yes ' >/dev/null || fail "infl8 plugins does not list ort-cpu as runnable"
echo "ok: infl8 segment --backend ort-cpu ran with ORT_DYLIB_PATH unset (labels = tract's)"
