#!/usr/bin/env bash
# Check (and, as root on Debian/Ubuntu, install) what napari needs from the system:
# an X server for tests (Xvfb) and Qt's runtime libraries.
set -euo pipefail

PACKAGES="make xvfb xauth libgl1 libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 \
libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 \
libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1"

missing=""
command -v xvfb-run >/dev/null 2>&1 || missing="xvfb-run"
for lib in libGL.so.1 libEGL.so.1 libxkbcommon-x11.so.0 libxcb-icccm.so.4 libxcb-image.so.0 \
    libxcb-keysyms.so.1 libxcb-randr.so.0 libxcb-render-util.so.0 libxcb-xinerama.so.0 \
    libxcb-xfixes.so.0 libxcb-shape.so.0 libxcb-cursor.so.0 libdbus-1.so.3 libfontconfig.so.1; do
    ldconfig -p 2>/dev/null | grep -q "$lib" || missing="$missing $lib"
done
[ -z "$missing" ] && exit 0

echo "missing system packages for napari/Qt:$missing"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing them with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq $PACKAGES >/dev/null
else
    echo "install them, then run this again:"
    echo "  sudo apt-get install -y $PACKAGES"
    exit 1
fi
