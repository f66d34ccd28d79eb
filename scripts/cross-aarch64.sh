#!/usr/bin/env bash
# Cross-builds infl8 for 64-bit ARM Linux (aarch64-unknown-linux-gnu:
# Raspberry Pi 5, AWS Graviton, the CPU side of a Jetson) on an x86_64 Debian
# or Ubuntu machine, without a container engine, and checks the result under
# user-mode QEMU:
#
#   1. installs what is missing: the rustup target, and as root through
#      apt-get gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, qemu-user-static
#      (plus `file`);
#   2. builds what runs below for aarch64: `infl8` (infl8-cli) and the tract
#      plugin (its tract-cuda backend for JetPack 6's CUDA 12); the ort plugin is only type-checked (`cargo check`: ONNX
#      Runtime's aarch64 library crashes under QEMU, so nothing of it runs
#      here, and linking it would cost minutes for nothing);
#   3. runs infl8-core's tests under QEMU (the runner of .cargo/config.toml);
#   4. runs one `infl8 segment` of a real T1 volume (an 8 mm axial slab of
#      Colin27 through the ventricles, the whole volume with --full) with the
#      shipped brain-mask model on the aarch64 binary and its tract plugin,
#      and compares the label map with the x86_64 build's (>= 99.9% of
#      voxels must agree, same grid and affine). The slab: user-mode QEMU
#      emulates the ViT's floating point in software, some 1000 times slower
#      than the host (about 40 s per 2 mm slab on 2 cores, an hour for the
#      whole of Colin27), too slow for CI.
#
# Usage: scripts/cross-aarch64.sh [--if-available] [--release]
#   --if-available  when the toolchain cannot be installed (no rustup, not
#                   root, no apt-get, no network), print "aarch64 cross build
#                   skipped: <why>" and exit 0 instead of failing. A build or
#                   check that fails is a failure either way.
#   --full          segment the whole of Colin27 under QEMU, not a slab
#   --release       build with the release profile (default: dev, whose
#                   dependencies are optimised anyway, see Cargo.toml; one
#                   compile then serves both the binaries and the tests).
#
# Outputs go to target/cross/ (CROSS_TARGET_DIR to change it): a target dir
# of its own, so this never waits on, or invalidates, the host build's.
# With a container engine, cross-rs does the same build from Cross.toml:
#   cross build --target aarch64-unknown-linux-gnu -p infl8-cli -p infl8-plugin-tract
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu
target_dir=${CROSS_TARGET_DIR:-target/cross}
if_available=0
profile=dev
full=0
for arg in "$@"; do
    case $arg in
        --if-available) if_available=1 ;;
        --full) full=1 ;;
        --release) profile=release ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "cross-aarch64.sh: unknown argument $arg (see --help)" >&2
            exit 2
            ;;
    esac
done
profile_dir=$([ "$profile" = release ] && echo release || echo debug)
out_dir="$target_dir/$target/$profile_dir"

# The toolchain could not be set up: not this project's failure on a machine
# that cannot cross-build, so with --if-available it is a skip.
skip() {
    if [ "$if_available" = 1 ]; then
        echo "aarch64 cross build skipped: $*"
        exit 0
    fi
    echo "aarch64 cross build failed: $*" >&2
    exit 1
}

now() { date +%s; }
t_start=$(now)
declare -a timings=()
phase_start=$t_start
phase() { # records the time since the previous phase under "$1"
    local t
    t=$(now)
    timings+=("$(printf '%-34s %5ss' "$1" $((t - phase_start)))")
    phase_start=$t
}

# --- 1. toolchain ----------------------------------------------------------
command -v rustup >/dev/null || skip "rustup not found (needed for the $target standard library)"
if ! rustup target list --installed | grep -qx "$target"; then
    echo "== rustup target add $target"
    rustup target add "$target" || skip "rustup target add $target failed"
fi

missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
[ -e "$sysroot/lib/libc.so" ] || missing+=(libc6-dev-arm64-cross)
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v file >/dev/null || missing+=(file)
if [ ${#missing[@]} -gt 0 ]; then
    echo "== apt-get install ${missing[*]}"
    command -v apt-get >/dev/null || skip "no apt-get to install ${missing[*]}"
    [ "$(id -u)" = 0 ] || skip "installing ${missing[*]} needs root (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } ||
        skip "apt-get install ${missing[*]} failed"
fi
command -v python3 >/dev/null || skip "python3 not found (compares the label maps)"
phase "toolchain"

# --- 2. build --------------------------------------------------------------
cargo_x() { cargo "$@" --target "$target" --target-dir "$target_dir" --profile "$profile"; }

echo "== cargo build ($profile) for $target: infl8-cli"
cargo_x build --locked -p infl8-cli
# The aarch64 GPUs infl8 targets are Jetsons, whose JetPack 6 has CUDA 12:
# the plugin's tract-cuda backend is built for that driver API (build only:
# no GPU here; its CPU backend `tract` is what runs below).
echo "== cargo build ($profile) for $target: infl8-plugin-tract (tract + tract-cuda, CUDA 12)"
cargo_x build --locked -p infl8-plugin-tract --no-default-features --features cuda-12
phase "build infl8, tract plugin"
echo "== cargo check ($profile) for $target: infl8-plugin-ort (nothing of it runs here)"
cargo_x check --locked -p infl8-plugin-ort
phase "check ort plugin"

infl8="$out_dir/infl8"
for f in "$infl8" "$out_dir/libinfl8_tract.so"; do
    desc=$(file -b "$f")
    echo "$f: $desc"
    case $desc in
        *"ARM aarch64"*) ;;
        *) echo "error: $f is not an aarch64 binary" >&2; exit 1 ;;
    esac
done

# --- 3. infl8-backend and infl8-core tests under QEMU ---------------------
echo "== cargo test -p infl8-backend -p infl8-core --target $target (under qemu-aarch64-static)"
cargo_x test --locked -p infl8-backend -p infl8-core
phase "infl8-backend and infl8-core tests (qemu)"

# --- 4. a real volume on the aarch64 binary -------------------------------
model=models/brain-mask.onnx
input=.cache/train-data/brain/colin27_image.nii.gz
what="Colin27 (whole volume)"
[ -f "$input" ] || ./scripts/fetch-train-data.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ "$full" = 0 ]; then
    # Axial slices 88..95 (world z 17..24 mm): the same voxels, header and
    # sform, the sform's origin moved to the first kept slice. The qform is
    # dropped (code 0) rather than recomputed: the sform (code 4) is what
    # the reader uses when both are set.
    python3 - "$input" "$work/slab.nii.gz" 88 96 <<'PY'
import gzip, struct, sys

src, dst, k0, k1 = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
raw = bytearray(gzip.open(src).read())
dim = list(struct.unpack("<8h", raw[40:56]))
bitpix = struct.unpack("<h", raw[72:74])[0]
offset = int(struct.unpack("<f", raw[108:112])[0])
if dim[0] < 3 or not 0 <= k0 < k1 <= dim[3] or bitpix % 8:
    sys.exit(f"{src}: cannot cut slices {k0}..{k1} from dims {dim}")
plane = dim[1] * dim[2] * bitpix // 8
data = raw[offset + k0 * plane : offset + k1 * plane]
dim[3] = k1 - k0
raw[40:56] = struct.pack("<8h", *dim)
raw[252:254] = struct.pack("<h", 0)  # qform_code
srow = list(struct.unpack("<12f", raw[280:328]))
for r in range(3):
    srow[4 * r + 3] += srow[4 * r + 2] * k0
raw[280:328] = struct.pack("<12f", *srow)
with gzip.open(dst, "wb") as f:
    f.write(bytes(raw[:offset]) + bytes(data))
PY
    input="$work/slab.nii.gz"
    what="Colin27, axial slices 88..95"
fi

# The x86_64 reference: the host build of the same sources. The very command
# of scripts/test.sh (same packages, targets and so features), so after the
# suite nothing is compiled again here.
echo "== x86_64 reference: infl8 segment on the host build"
cargo build --locked --workspace --all-targets
t=$(now)
RUST_LOG=warn "${CARGO_TARGET_DIR:-target}/debug/infl8" segment --model "$model" --input "$input" \
    --output "$work/x86_64.nii.gz"
host_s=$(($(now) - t))
phase "x86_64 segment (reference)"

# The plugin is found next to the executable; qemu's -L gives the dynamic
# loader (of infl8 and of the dlopen'ed plugin) the aarch64 sysroot.
echo "== aarch64: infl8 segment under qemu-aarch64-static"
t=$(now)
RUST_LOG=warn qemu-aarch64-static -L "$sysroot" "$infl8" segment --model "$model" \
    --input "$input" --output "$work/aarch64.nii.gz"
qemu_s=$(($(now) - t))
phase "aarch64 segment (qemu)"

python3 - "$input" "$work/x86_64.nii.gz" "$work/aarch64.nii.gz" <<'PY'
# Valid NIfTI-1 label maps on the input's grid, agreeing with each other.
import gzip, struct, sys

def read(path):
    raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
    if len(raw) < 352 or struct.unpack("<i", raw[:4])[0] != 348:
        sys.exit(f"{path}: not a little-endian NIfTI-1 file")
    if raw[344:348] != b"n+1\0":
        sys.exit(f"{path}: bad NIfTI-1 magic {raw[344:348]!r}")
    dim = struct.unpack("<8h", raw[40:56])
    datatype, bitpix = struct.unpack("<hh", raw[70:74])
    offset = int(struct.unpack("<f", raw[108:112])[0])
    srow = struct.unpack("<12f", raw[280:328])
    shape = dim[1 : 1 + dim[0]]
    n = 1
    for d in shape:
        n *= d
    return dict(shape=shape[:3], datatype=datatype, bitpix=bitpix, srow=srow,
                data=raw[offset:], n=n)

image, host, arm = (read(p) for p in sys.argv[1:4])
for name, v in (("x86_64", host), ("aarch64", arm)):
    if v["datatype"] != 2 or v["bitpix"] != 8:
        sys.exit(f"{name}: labels are not uint8 (datatype {v['datatype']})")
    if v["shape"] != image["shape"]:
        sys.exit(f"{name}: grid {v['shape']} is not the input's {image['shape']}")
    if len(v["data"]) < v["n"]:
        sys.exit(f"{name}: {len(v['data'])} voxel bytes, the header declares {v['n']}")
    if max(abs(a - b) for a, b in zip(v["srow"], image["srow"])) > 1e-4:
        sys.exit(f"{name}: affine differs from the input's")
a, b = host["data"][: host["n"]], arm["data"][: arm["n"]]
same = sum(x == y for x, y in zip(a, b))
brain = sum(1 for x in b if x)
agree = same / len(a)
print(f"labels: {len(a)} voxels, {brain} brain on aarch64, agreement with x86_64 {agree:.6f}")
if brain == 0:
    sys.exit("aarch64: empty mask")
if agree < 0.999:
    sys.exit(f"aarch64 and x86_64 label maps agree on {agree:.4%} < 99.9% of voxels")
PY
phase "compare"

echo
echo "aarch64 cross build: ok ($profile profile, $out_dir)"
echo "  segment of $what: x86_64 ${host_s}s, aarch64 under qemu ${qemu_s}s"
for line in "${timings[@]}"; do
    echo "  $line"
done
echo "  total                              $(($(now) - t_start))s"
