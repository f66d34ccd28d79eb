#!/usr/bin/env bash
# End-to-end benchmark: `infl8 segment` on a real volume for every backend x
# precision this machine can run, as a Markdown table.
#
#   benches/e2e.sh MODEL_FP32 INPUT [--int8 MODEL_INT8] [--runs N] [-- extra segment flags]
#
# Rows: tract, ort-cpu, and (with a GPU, `nvidia-smi` working, and a GPU
# build of ONNX Runtime) ort-cuda and ort-tensorrt, each for the fp32 model
# and, with --int8 (e.g. from `infl8-train quantize`), the int8 one. A row
# that cannot run is listed under the table with the reason.
#
# Columns, each the median of N runs (default 3):
#   s/volume     wall clock of one `infl8 segment` process (model load included)
#   windows/s    windows / inference seconds (the report's infer_s)
#   peak RSS MB  /usr/bin/time -v "Maximum resident set size" (else the
#                report's peak_rss_bytes, said under the table)
#   GFLOP/s      `infl8 info`'s FLOPs per window x windows / inference seconds
#
# Uses target/release/infl8 (cargo build --release --workspace; E2E_BIN to
# override: not INFL8_*, which infl8 reads as settings) and python3. ONNX Runtime: ORT_DYLIB_PATH, else
# .cache/onnxruntime/cpu/libonnxruntime.so (./scripts/fetch-ort.sh); for the
# GPU rows ORT_GPU_DYLIB_PATH, else .cache/onnxruntime/gpu/libonnxruntime.so
# (./scripts/fetch-ort.sh --gpu).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
usage="usage: benches/e2e.sh MODEL_FP32 INPUT [--int8 MODEL_INT8] [--runs N] [-- segment flags]"

model_fp32=${1:?$usage}
input=${2:?$usage}
shift 2
model_int8=
runs=3
while [ $# -gt 0 ]; do
  case "$1" in
    --int8) model_int8=${2:?$usage}; shift 2 ;;
    --runs) runs=${2:?$usage}; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "e2e: unknown argument $1" >&2; echo "$usage" >&2; exit 2 ;;
  esac
done
case "$runs" in ''|*[!0-9]*|0) echo "e2e: --runs needs a positive integer" >&2; exit 2 ;; esac
for f in "$model_fp32" "$input" ${model_int8:+"$model_int8"}; do
  [ -f "$f" ] || { echo "e2e: $f does not exist" >&2; exit 1; }
done
command -v python3 >/dev/null || { echo "e2e: needs python3" >&2; exit 1; }
bin=${E2E_BIN:-$root/target/release/infl8}
[ -x "$bin" ] || { echo "e2e: $bin missing: cargo build --release --workspace" >&2; exit 1; }
ort_cpu=${ORT_DYLIB_PATH:-$root/.cache/onnxruntime/cpu/libonnxruntime.so}
ort_gpu=${ORT_GPU_DYLIB_PATH:-$root/.cache/onnxruntime/gpu/libonnxruntime.so}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --- the machine -----------------------------------------------------------
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n1)
[ -n "$cpu" ] || cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n1)
ram_kb=$(sed -n 's/^MemTotal:[[:space:]]*\([0-9]*\) kB/\1/p' /proc/meminfo 2>/dev/null)
gpu=
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | paste -sd ';' -)
fi
echo "## infl8 end-to-end benchmark"
echo
echo "- machine: ${cpu:-unknown CPU}, $(nproc) cores, $(( ${ram_kb:-0} / 1024 / 1024 )) GiB RAM"
echo "- GPU: ${gpu:-none (nvidia-smi not available)}"
echo "- input: $input; runs per row: $runs (medians)"
echo "- infl8: $("$bin" --version 2>/dev/null || echo "$bin")"

# --- FLOPs per window, from `infl8 info` ------------------------------------
declare -A model=([fp32]=$model_fp32) gflop=()
[ -n "$model_int8" ] && model[int8]=$model_int8
for p in fp32 int8; do
  [ -n "${model[$p]:-}" ] || continue
  flops=$("$bin" info "${model[$p]}" 2>/dev/null | sed -n 's/^FLOPs per window: //p' | head -n1)
  # Empty when info has no number ("unknown (...)"): GFLOP/s is then n/a.
  gflop[$p]=$(sed -n 's/^\([0-9.]*\) GFLOP.*/\1/p' <<<"$flops")
  echo "- $p model: ${model[$p]}; FLOPs per window: ${flops:-not reported by infl8 info}"
done
echo

# --- which rows can run -----------------------------------------------------
notes=()
[ -z "$model_int8" ] && notes+=("int8 rows: no --int8 model given")
if ! "$bin" plugins >"$work/plugins" 2>&1; then
  notes+=("\`infl8 plugins\` failed: $(grep -v '^\s*$' "$work/plugins" | tail -n1)")
fi
listed=$(awk 'NR > 1 && !/^(refused|searched|error):/ {print $1}' "$work/plugins")
has_backend() { grep -qx "$1" <<<"$listed"; }
declare -A lib_for  # backend -> the ONNX Runtime library it loads
backends=()
if has_backend tract; then
  backends+=(tract)
else
  notes+=("tract: not listed by \`infl8 plugins\`")
fi
if ! has_backend ort-cpu; then
  notes+=("ort-cpu: not listed by \`infl8 plugins\` (the ort plugin needs Rust 1.92+)")
elif [ ! -f "$ort_cpu" ]; then
  notes+=("ort-cpu: no ONNX Runtime at $ort_cpu (./scripts/fetch-ort.sh or ORT_DYLIB_PATH)")
else
  backends+=(ort-cpu)
  lib_for[ort-cpu]=$ort_cpu
fi
for b in ort-cuda ort-tensorrt; do
  if ! has_backend "$b"; then
    notes+=("$b: not listed by \`infl8 plugins\`")
  elif [ -z "$gpu" ]; then
    notes+=("$b: no GPU (nvidia-smi not available)")
  elif [ ! -f "$ort_gpu" ]; then
    notes+=("$b: no GPU ONNX Runtime at $ort_gpu (./scripts/fetch-ort.sh --gpu or ORT_GPU_DYLIB_PATH)")
  else
    backends+=("$b")
    lib_for[$b]=$ort_gpu
  fi
done

rss_source=time
if [ ! -x /usr/bin/time ]; then
  rss_source=report
  notes+=("peak RSS: /usr/bin/time missing, taken from the report's peak_rss_bytes")
fi

# --- the runs ---------------------------------------------------------------
# One run: prints "seconds windows infer_s peak_rss_bytes", or fails with the
# command's last error line on stderr.
run_once() {
  local backend=$1 m=$2 start end
  local -a env_=(env)
  [ -n "${lib_for[$backend]:-}" ] && env_+=("ORT_DYLIB_PATH=${lib_for[$backend]}")
  local -a cmd=("$bin" segment --backend "$backend" --model "$m" --input "$input"
    --output "$work/out.nii.gz" --report "$work/report.json" "${extra[@]}")
  rm -f "$work/report.json" "$work/time.txt"
  start=$(date +%s.%N)
  if [ "$rss_source" = time ]; then
    "${env_[@]}" /usr/bin/time -v -o "$work/time.txt" "${cmd[@]}" >/dev/null 2>"$work/log" || {
      grep -v '^\s*$' "$work/log" | tail -n1 >&2; return 1; }
  else
    "${env_[@]}" "${cmd[@]}" >/dev/null 2>"$work/log" || {
      grep -v '^\s*$' "$work/log" | tail -n1 >&2; return 1; }
  fi
  end=$(date +%s.%N)
  python3 - "$work/report.json" "$start" "$end" "$work/time.txt" <<'PY'
import json, os, re, sys
r = json.load(open(sys.argv[1]))[0]
rss = r.get("peak_rss_bytes") or 0
if os.path.exists(sys.argv[4]):
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(sys.argv[4]).read())
    if m:
        rss = int(m.group(1)) * 1024
print(float(sys.argv[3]) - float(sys.argv[2]), r["windows"], r["infer_s"], rss)
PY
}

extra=("$@")
rows=()
for b in "${backends[@]}"; do
  for p in fp32 int8; do
    [ -n "${model[$p]:-}" ] || continue
    echo "e2e: $b $p ($runs run(s))..." >&2
    : >"$work/runs"
    failed=
    for _ in $(seq 1 "$runs"); do
      if ! run_once "$b" "${model[$p]}" >>"$work/runs" 2>"$work/err"; then
        failed=$(tail -n1 "$work/err")
        break
      fi
    done
    if [ -n "$failed" ]; then
      notes+=("$b $p: failed: ${failed:0:300}")
      continue
    fi
    rows+=("$(python3 - "$b" "$p" "${gflop[$p]:-}" "$work/runs" <<'PY'
import statistics as st, sys
b, p, g = sys.argv[1], sys.argv[2], sys.argv[3]
runs = [l.split() for l in open(sys.argv[4]) if l.strip()]
secs = st.median(float(r[0]) for r in runs)
wps = st.median(int(r[1]) / float(r[2]) for r in runs if float(r[2]) > 0)
rss = st.median(int(r[3]) for r in runs) / 2**20
gf = f"{float(g) * wps:.1f}" if g else "n/a"
print(f"| {b} | {p} | {secs:.2f} | {wps:.1f} | {rss:.0f} | {gf} |")
PY
)")
  done
done

echo "| backend | precision | s/volume | windows/s | peak RSS MB | GFLOP/s |"
echo "| --- | --- | ---: | ---: | ---: | ---: |"
for r in "${rows[@]}"; do echo "$r"; done
if [ ${#notes[@]} -gt 0 ]; then
  echo
  for n in "${notes[@]}"; do echo "- $n"; done
fi
[ ${#rows[@]} -gt 0 ]
