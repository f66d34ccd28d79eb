#!/usr/bin/env bash
# End-to-end benchmark: runs `infl8 segment` on a real volume several times
# and prints seconds per volume, windows per second and peak RSS.
#
#   benches/e2e.sh MODEL.onnx INPUT.nii.gz [RUNS] [-- extra infl8 segment flags]
#
# Uses target/release/infl8 (built with `cargo build --release --workspace`).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=${1:?usage: benches/e2e.sh MODEL INPUT [RUNS] [-- flags]}
input=${2:?usage: benches/e2e.sh MODEL INPUT [RUNS] [-- flags]}
runs=${3:-3}
shift $(( $# < 3 ? $# : 3 ))
[ "${1:-}" = "--" ] && shift
bin=${INFL8_BIN:-$root/target/release/infl8}
[ -x "$bin" ] || { echo "e2e: $bin missing: cargo build --release --workspace" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

printf '%-4s %10s %10s %12s %12s\n' run seconds windows windows/s peak_MB
total=0
for i in $(seq 1 "$runs"); do
  start=$(date +%s.%N)
  "$bin" segment --model "$model" --input "$input" --output "$work/out.nii.gz" \
    --report "$work/report.json" "$@" 2>"$work/log" || { cat "$work/log" >&2; exit 1; }
  end=$(date +%s.%N)
  python3 - "$work/report.json" "$start" "$end" "$i" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))[0]
secs = float(sys.argv[3]) - float(sys.argv[2])
w = r["windows"]
print(f'{sys.argv[4]:<4} {secs:10.2f} {w:10d} {w / r["infer_s"]:12.1f} {r.get("peak_rss_bytes", 0) / 2**20:12.1f}')
PY
done
