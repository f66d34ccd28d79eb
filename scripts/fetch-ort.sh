#!/usr/bin/env bash
# Fetches the ONNX Runtime shared library that the ort plugin loads at run
# time, from the onnxruntime wheels on PyPI, into .cache/ (ignored by git):
#   .cache/onnxruntime/cpu/  libonnxruntime.so (+ libonnxruntime_providers_shared.so)
#                            from `onnxruntime` (CPU execution provider only)
#   .cache/onnxruntime/gpu/  the same plus the CUDA and TensorRT provider
#                            libraries, from `onnxruntime-gpu` (with --gpu;
#                            x86_64 only: PyPI has no aarch64 GPU wheel, use
#                            JetPack's ONNX Runtime on Jetson)
# and installs the last one fetched (the GPU build with --gpu) where the ort
# plugin finds it without any setting: the per-user data folder
#   ${XDG_DATA_HOME:-~/.local/share}/infl8/onnxruntime/
# (unless --no-install; docs/ort.md gives the plugin's whole search order).
# Prints the path of the installed libonnxruntime.so on stdout (or, with
# --no-install, of the fetched one: a value for ORT_DYLIB_PATH). Only the
# package registry is contacted (pip download --no-deps); wheels are checked
# against the SHA-256 sums below. Idempotent; each folder is replaced
# atomically (a symlink to a versioned folder), so a reader never sees half
# a library. ORT_FETCH_CACHE overrides .cache/onnxruntime (tests).
set -euo pipefail
shopt -s inherit_errexit

ORT_VERSION=1.24.4
# The wheels are pinned by file name (CPython 3.12 tags, whatever python runs
# pip: only the shared library inside is used) and checked by SHA-256.
declare -A WHEEL_SHA256=(
  [onnxruntime-1.24.4-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl]=0d640eb9f3782689b55cfa715094474cd5662f2f137be6a6f847a594b6e9705c
  [onnxruntime-1.24.4-cp312-cp312-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl]=1a5c5a544b22f90859c88617ecb30e161ee3349fcc73878854f43d77f00558b5
  [onnxruntime_gpu-1.24.4-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl]=eb0e38f0c1ef3b76ae0081c8e51eed20dd8925aa916f0fc6f9b8b17d05610e99
)

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${ORT_FETCH_CACHE:-$root/.cache/onnxruntime}
python=${PYTHON:-python3}
want_cpu=1
want_gpu=0
install=1
for arg in "$@"; do
  case "$arg" in
    --gpu) want_gpu=1 ;;
    --gpu-only) want_gpu=1; want_cpu=0 ;;
    --no-install) install=0 ;;
    -h|--help) sed -n '2,22p' "$0"; echo "usage: $0 [--gpu | --gpu-only] [--no-install]"; exit 0 ;;
    *) echo "fetch-ort: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) arch=x86_64 ;;
  Linux-aarch64|Linux-arm64) arch=aarch64 ;;
  *) echo "fetch-ort: no pinned ONNX Runtime wheel for $(uname -s) $(uname -m);" \
          "install ONNX Runtime ${ORT_VERSION%.*}+ and set ORT_DYLIB_PATH" >&2; exit 1 ;;
esac

# fetch FLAVOUR PACKAGE: download, check and unpack PACKAGE==ORT_VERSION into
# $cache/FLAVOUR; print the library path.
fetch() {
  local flavour=$1 package=$2
  local wheel="${package//-/_}-${ORT_VERSION}-cp312-cp312-manylinux_2_27_${arch}.manylinux_2_28_${arch}.whl"
  local sum=${WHEEL_SHA256[$wheel]:-}
  if [ -z "$sum" ]; then
    echo "fetch-ort: no pinned $package wheel for $arch (PyPI has no aarch64 GPU wheel:" \
         "on Jetson use JetPack's ONNX Runtime and set ORT_DYLIB_PATH)" >&2
    return 1
  fi
  local real="$cache/$flavour-$ORT_VERSION-${sum:0:12}"
  local link="$cache/$flavour"
  if [ ! -f "$real/.complete" ]; then
    mkdir -p "$cache"
    local tmp
    tmp=$(mktemp -d "$cache/.$flavour.XXXXXX")
    # Removed on any exit from here on, success included (it is renamed away
    # first on success).
    trap "rm -rf '$tmp'" EXIT
    echo "fetch-ort: pip download $package==$ORT_VERSION ($arch)" >&2
    "$python" -m pip download --quiet --no-deps --only-binary=:all: \
      --platform "manylinux_2_27_$arch" --python-version 3.12 --implementation cp --abi cp312 \
      "$package==$ORT_VERSION" -d "$tmp/wheel" >&2
    if [ ! -f "$tmp/wheel/$wheel" ]; then
      echo "fetch-ort: pip did not produce $wheel (got: $(ls "$tmp/wheel"))" >&2
      return 1
    fi
    echo "$sum  $tmp/wheel/$wheel" | sha256sum -c --quiet - >&2 || {
      echo "fetch-ort: checksum mismatch for $wheel (expected $sum)" >&2
      return 1
    }
    "$python" - "$tmp/wheel/$wheel" "$tmp/lib" "$ORT_VERSION" <<'PY'
import os, re, shutil, sys, zipfile
wheel, dest, version = sys.argv[1:]
os.makedirs(dest)
names = []
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        m = re.fullmatch(r"onnxruntime/capi/(libonnxruntime[^/]*\.so(\.[0-9.]+)?)", info.filename)
        if not m:
            continue
        with z.open(info) as src, open(os.path.join(dest, m.group(1)), "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.chmod(os.path.join(dest, m.group(1)), 0o755)
        names.append(m.group(1))
main = f"libonnxruntime.so.{version}"
if main not in names:
    sys.exit(f"fetch-ort: {main} is not in {os.path.basename(wheel)} (found: {names})")
# The names the loader and ORT_DYLIB_PATH use.
for alias in ("libonnxruntime.so", "libonnxruntime.so.1"):
    os.symlink(main, os.path.join(dest, alias))
print("\n".join(sorted(names)), file=sys.stderr)
PY
    printf '%s %s %s\n' "$package" "$ORT_VERSION" "$sum" > "$tmp/lib/.complete"
    rm -rf "$real"
    mv "$tmp/lib" "$real"
    rm -rf "$tmp"
    trap - EXIT
  fi
  # Point the stable name at the versioned folder: a symlink renamed over the
  # old one, so the switch is atomic.
  ln -sfn "$(basename "$real")" "$link.tmp.$$"
  mv -T "$link.tmp.$$" "$link"
  # Older versions' folders are no longer referenced.
  for old in "$cache/$flavour"-*; do
    [ "$old" = "$real" ] || [ ! -d "$old" ] || rm -rf "$old"
  done
  echo "$link/libonnxruntime.so"
}

# publish SRC-DIR DEST: DEST becomes a symlink to a versioned copy of
# SRC-DIR beside it, switched atomically; older copies are removed.
publish() {
  local src=$1 dest=$2
  local real
  real="$dest-$(basename "$(readlink -f "$src")")"
  mkdir -p "$(dirname "$dest")"
  if [ ! -f "$real/.complete" ]; then
    rm -rf "$real.part"
    cp -a "$(readlink -f "$src")" "$real.part"
    rm -rf "$real"
    mv "$real.part" "$real"
  fi
  ln -sfn "$(basename "$real")" "$dest.tmp.$$"
  mv -T "$dest.tmp.$$" "$dest"
  for old in "$dest"-*; do
    [ "$old" = "$real" ] || [ ! -d "$old" ] || rm -rf "$old"
  done
}

lib=""
if [ $want_cpu = 1 ]; then lib=$(fetch cpu onnxruntime); fi
if [ $want_gpu = 1 ]; then lib=$(fetch gpu onnxruntime-gpu); fi
if [ $install = 1 ]; then
  # Where the plugin looks (runtime.rs): a relative XDG_DATA_HOME is ignored.
  data=${XDG_DATA_HOME:-}
  case "$data" in /*) ;; *) data="${HOME:?HOME is not set}/.local/share" ;; esac
  publish "$(dirname "$lib")" "$data/infl8/onnxruntime"
  lib="$data/infl8/onnxruntime/libonnxruntime.so"
  echo "fetch-ort: ok (ONNX Runtime $ORT_VERSION installed into $(dirname "$lib");" \
       "the ort plugin finds it there, no setting needed)" >&2
else
  echo "fetch-ort: ok (ONNX Runtime $ORT_VERSION; export ORT_DYLIB_PATH=$lib)" >&2
fi
echo "$lib"
