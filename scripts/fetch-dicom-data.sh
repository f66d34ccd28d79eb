#!/usr/bin/env bash
# Real DICOM series for infl8-dicom's tests, from a registry package:
# PyPI pydicom 3.0.2 (MIT) ships downsized image sets from pcir.org in
# pydicom/data/test_files/dicomdirtests/ (its README.txt says where they
# come from). Used here:
#   98892001/CT5N/  5 axial CT slices, 16x16, 2.5 mm apart (a volume)
#   77654033/CT2/   4 CT slices with uneven gaps (must be refused)
#   98892003/MR700/ 7 MR slices whose orientations differ (must be refused)
# The wheel and every file used are checked against scripts/dicom-data.sha256.
#
#   scripts/fetch-dicom-data.sh      -> .cache/dicom-data/pydicom-3.0.2/...
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=$root/.cache
sums=$root/scripts/dicom-data.sha256
python=${PYTHON:-python3}
wheel=wheels/pydicom-3.0.2-py3-none-any.whl
die() { echo "fetch-dicom-data: ERROR: $*" >&2; exit 1; }

all_ok() { (cd "$cache" && sha256sum --quiet --check <(grep -v '^#' "$sums") >/dev/null 2>&1); }
if all_ok; then
  echo "fetch-dicom-data: files present" >&2
  exit 0
fi
mkdir -p "$cache/wheels"
want=$(awk -v f="$wheel" '$2 == f { print $1 }' "$sums")
if [ "$(sha256sum "$cache/$wheel" 2>/dev/null | cut -d' ' -f1)" != "$want" ]; then
  echo "fetch-dicom-data: pip download pydicom==3.0.2" >&2
  "$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$cache/wheels" pydicom==3.0.2 >&2 ||
    die "could not download pydicom 3.0.2 from PyPI"
  [ "$(sha256sum "$cache/$wheel" | cut -d' ' -f1)" = "$want" ] ||
    die "$wheel: sha256 differs from the pinned one; refusing to use it"
fi
dest=$cache/dicom-data/pydicom-3.0.2
rm -rf "$dest.part" && mkdir -p "$dest.part"
members=$(grep -v '^#' "$sums" | awk '{ print $2 }' | grep '^dicom-data/' | sed 's#^dicom-data/pydicom-3.0.2/##')
# shellcheck disable=SC2086
(cd "$dest.part" && "$python" -m zipfile -e "$cache/$wheel" . >/dev/null) ||
  die "could not unpack $wheel"
mkdir -p "$dest.keep"
for m in $members; do
  mkdir -p "$(dirname "$dest.keep/$m")"
  mv "$dest.part/$m" "$dest.keep/$m" || die "$wheel has no $m"
done
rm -rf "$dest.part" "$dest" && mv "$dest.keep" "$dest"
all_ok || die "extracted files differ from scripts/dicom-data.sha256"
echo "fetch-dicom-data: ok: $dest" >&2
