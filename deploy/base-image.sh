#!/bin/sh
# Build the offline base image from Debian packages: a bookworm root filesystem made with
# `debootstrap --variant=minbase` plus python3.11 and python3-venv (its ensurepip carries
# Debian's pip wheel), committed as a local image. Needs root and a Debian mirror (the one apt
# uses here); no container registry. About 1.5 minutes, ~200 MB.
#
#   deploy/base-image.sh                       # -> localhost/biofp-base:bookworm
#   BASE_TAG=localhost/mybase:1 DEBIAN_MIRROR=http://mirror.example/debian deploy/base-image.sh
#
# The image is imported with `docker import` when a Docker daemon answers, else with buildah
# (vfs storage, which needs no kernel overlay support), where podman finds it too.
set -eu
TAG=${BASE_TAG:-localhost/biofp-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${DEBIAN_SUITE:-bookworm}
for tool in debootstrap tar; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install -y $tool)" >&2; exit 1; }
done
work=$(mktemp -d "${TMPDIR:-/var/tmp}/biofp-base.XXXXXX")
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
echo "debootstrap $SUITE from $MIRROR into $root" >&2
debootstrap --variant=minbase --include=python3.11,python3-venv,ca-certificates \
    "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -5 "$work/debootstrap.log" >&2; echo "error: debootstrap failed" >&2; exit 1; }
# trim: apt lists and caches, documentation, man pages, locales other than C
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/* "$root"/var/log/*.log "$root"/tmp/*
tar -C "$root" --numeric-owner -cf "$work/rootfs.tar" .
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
        "$work/rootfs.tar" "$TAG" >/dev/null
else
    command -v buildah >/dev/null || { echo "error: neither a Docker daemon nor buildah (apt-get install -y buildah)" >&2; exit 1; }
    B="buildah --storage-driver ${STORAGE_DRIVER:-vfs}"
    ctr=$($B from scratch)
    $B add "$ctr" "$work/rootfs.tar" / >/dev/null
    $B config --env LANG=C.UTF-8 --cmd /bin/bash --created-by "biofp deploy/base-image.sh" "$ctr"
    $B commit --rm "$ctr" "$TAG" >/dev/null
fi
echo "$TAG"
