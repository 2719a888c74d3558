#!/usr/bin/env bash
# Builds the CPU image (Containerfile) with buildah where no image registry can be reached: the base is a
# Debian root file system made by debootstrap, imported as localhost/histosurv-base. With a registry, use
# `docker build` (or `buildah bud`) on Containerfile directly, as its header says.
#   deploy/image/build.sh [IMAGE]          (default IMAGE: localhost/histosurv:cpu; needs root, buildah, debootstrap)
# Environment: WORK (default build/image: the context, rootfs.tar is kept there and reused), MIRROR (Debian
# mirror; default: the one apt uses on this machine), PYTHON (the interpreter that builds the wheel).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
image="${1:-localhost/histosurv:cpu}"
work="${WORK:-$root/build/image}"
python="${PYTHON:-$root/.venv/bin/python}"
mirror="${MIRROR:-$( (grep -rhoE '^URIs: https?://[^ ]+/debian/?$' /etc/apt/sources.list.d/ 2>/dev/null || true) | sed 's/^URIs: //' | head -1)}"
mirror="${mirror:-http://deb.debian.org/debian}"
buildah=(buildah --storage-driver vfs)
for tool in buildah debootstrap; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool is not installed (apt-get install buildah debootstrap)" >&2; exit 2; }
done
mkdir -p "$work/context"

if [ ! -s "$work/rootfs.tar" ]; then
    echo "debootstrap: bookworm minbase with python3 from $mirror"
    rm -rf "$work/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log"
    rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
    tar -C "$work/rootfs" -cf "$work/rootfs.tar.part" . && mv "$work/rootfs.tar.part" "$work/rootfs.tar"
    rm -rf "$work/rootfs"
fi
mkdir -p "$work/base"
ln -f "$work/rootfs.tar" "$work/base/rootfs.tar" 2>/dev/null || cp "$work/rootfs.tar" "$work/base/rootfs.tar"
"${buildah[@]}" bud --quiet --isolation chroot -f "$here/Containerfile.rootfs" -t localhost/histosurv-base "$work/base" >/dev/null

rm -f "$work/context/"histosurv-*.whl
"$python" -m pip wheel --quiet --no-deps --no-build-isolation -w "$work/context" "$root"
ca="${PIP_CERT:-$(python3 -c 'import configparser,os;c=configparser.ConfigParser();c.read(["/etc/pip.conf",os.path.expanduser("~/.config/pip/pip.conf")]);print(c.get("global","cert",fallback=""))' 2>/dev/null || true)}"
secret=(); [ -n "$ca" ] && [ -s "$ca" ] && secret=(--secret "id=pipca,src=$ca")
"${buildah[@]}" bud --isolation chroot --format docker --layers=false --build-arg BASE=localhost/histosurv-base "${secret[@]}" \
    -f "$here/Containerfile" -t "$image" "$work/context"
"${buildah[@]}" images "$image"
