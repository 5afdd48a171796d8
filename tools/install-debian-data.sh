#!/bin/sh
# Install the Debian data package the vision suite reads (Fashion-MNIST), with or without root:
# apt-get install when we are root (or sudo works without a password), else `apt-get download`
# and unpack it under $EDGEMERGE_CACHE/debian (default ~/.cache/edgemerge/debian), which
# edgemerge/suites/vision_data.py also searches. Exits non-zero when neither works.
set -eu
PKG=dataset-fashion-mnist
if [ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && apt-get install -y -q "$PKG" >/dev/null 2>&1; then
    exit 0
fi
if command -v sudo >/dev/null 2>&1 && sudo -n apt-get install -y -q "$PKG" >/dev/null 2>&1; then
    exit 0
fi
DEST="${EDGEMERGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgemerge}/debian"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && apt-get download "$PKG" >/dev/null 2>&1) || {
    echo "could not install or download the Debian package $PKG (is apt available and its lists updated?)" >&2
    exit 1
}
mkdir -p "$DEST"
dpkg -x "$TMP"/"$PKG"_*.deb "$DEST"
echo "$PKG unpacked under $DEST"
