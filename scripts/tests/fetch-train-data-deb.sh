#!/usr/bin/env bash
# Checks the Debian step of scripts/fetch-train-data.sh against a fake
# apt-get that offers a version other than the pinned one (as happens when
# Debian's archive moves to the next point release):
#   - a package that carries the pinned files unchanged is accepted;
#   - one whose files changed is refused, naming the file, and nothing of it
#     lands in raw/.
# Needs dpkg-deb and the pinned mricron-data files (scripts/fetch-train-data.sh
# extracts them into .cache/train-data/raw/); touches nothing under .cache/.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
pinned_ver=1.2.20211006+dfsg-4
src="$root/.cache/train-data/raw/mricron-data-$pinned_ver"
members=(usr/share/mricron/templates/ch2.nii.gz usr/share/mricron/templates/ch2bet.nii.gz
         usr/share/doc/mricron-data/copyright)
for m in "${members[@]}"; do
  [ -f "$src/$m" ] || { echo "fetch-train-data-deb: $src/$m is missing: run scripts/fetch-train-data.sh first" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# make_deb VERSION [CHANGED-MEMBER]: a mricron-data_VERSION_all.deb of the
# pinned files, one of them altered if named.
make_deb() {
  local ver=$1 changed=${2:-} pkg="$work/pkg-$1"
  for m in "${members[@]}"; do
    mkdir -p "$(dirname "$pkg/$m")" && cp "$src/$m" "$pkg/$m"
  done
  [ -z "$changed" ] || printf 'x' >> "$pkg/$changed"
  mkdir -p "$pkg/DEBIAN"
  printf 'Package: mricron-data\nVersion: %s\nArchitecture: all\nMaintainer: test <t@example.invalid>\nDescription: test\n' \
    "$ver" > "$pkg/DEBIAN/control"
  dpkg-deb --root-owner-group --build "$pkg" "$work/mricron-data_${ver}_all.deb" >/dev/null
}
make_deb 1.2.20211006+dfsg-4+deb12u9
make_deb 1.3-1 usr/share/mricron/templates/ch2.nii.gz

mkdir -p "$work/bin"
cat > "$work/bin/apt-get" <<'SH'
#!/bin/sh
# Fake apt-get: `download NAME` copies $FAKE_DEB here; `update` does nothing.
case "$*" in
  *download*) cp "$FAKE_DEB" . ;;
  *update*) ;;
  *) exit 100 ;;
esac
SH
chmod +x "$work/bin/apt-get"

# run_deb CACHE DEB: the script's `deb` step for mricron-data with apt-get
# offering DEB; prints stderr, returns its status.
run_deb() {
  local dir=$1 offered=$2
  (
    set --
    # shellcheck source=../fetch-train-data.sh
    source "$root/scripts/fetch-train-data.sh"
    cache=$dir raw="$dir/train-data/raw" downloaded=0 used_bytes=0
    mkdir -p "$cache/debs" "$raw"
    PATH="$work/bin:$PATH" FAKE_DEB=$offered deb "mricron-data=$pinned_ver" "${members[@]}"
  ) 2>&1
}

fail() { echo "fetch-train-data-deb: FAIL: $*" >&2; exit 1; }

out=$(run_deb "$work/good" "$work/mricron-data_1.2.20211006+dfsg-4+deb12u9_all.deb") ||
  fail "a new version with the pinned files was refused: $out"
for m in "${members[@]}"; do
  cmp -s "$src/$m" "$work/good/train-data/raw/mricron-data-$pinned_ver/$m" || fail "$m not extracted"
done
[ -f "$work/good/debs/mricron-data_1.2.20211006+dfsg-4+deb12u9_all.deb" ] || fail "package not kept"
echo "ok: another version carrying the pinned files is accepted"

if out=$(run_deb "$work/bad" "$work/mricron-data_1.3-1_all.deb"); then
  fail "a package with a changed file was accepted: $out"
fi
case "$out" in
  *"mricron-data_1.3-1_all.deb: usr/share/mricron/templates/ch2.nii.gz differs from the file pinned"*) ;;
  *) fail "unclear message: $out" ;;
esac
[ -z "$(ls -A "$work/bad/train-data/raw/" 2>/dev/null)" ] || fail "a changed package left files in raw/"
echo "ok: a package whose files changed is refused: ${out##*ERROR: }"
