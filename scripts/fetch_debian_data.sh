#!/usr/bin/env bash
# Fetch the Debian data packages leanfit's zoo reads (r-cran-janeaustenr for `austen`,
# dataset-fashion-mnist for `fashion-mnist`), without root and without pulling their dependencies
# (R): `apt-get download` + `dpkg -x` into DEST.
# Usage: scripts/fetch_debian_data.sh [DEST]   (default: ./.data; point LEANFIT_DATA_DIR at DEST)
set -euo pipefail

DEST="${1:-${LEANFIT_DATA_DIR:-.data}}"
PACKAGES=(r-cran-janeaustenr dataset-fashion-mnist)

if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg >/dev/null 2>&1; then
    echo "fetch_debian_data: apt-get/dpkg not found (not a Debian-like system); skipping ${PACKAGES[*]}." >&2
    exit 0
fi

mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

for pkg in "${PACKAGES[@]}"; do
    # apt warns that its _apt user cannot write the temporary folder and downloads as root: harmless.
    (cd "$WORK" && apt-get download "$pkg" 2> >(grep -v "unsandboxed as root" >&2))
done
for deb in "$WORK"/*.deb; do
    dpkg -x "$deb" "$DEST"
    echo "fetch_debian_data: unpacked $(basename "$deb") into $DEST"
done
echo "fetch_debian_data: done; leanfit looks in \$LEANFIT_DATA_DIR (default ./.data)."
