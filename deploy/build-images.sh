#!/bin/sh
# Build the site image (client/Dockerfile) and the coordinator image (server/Dockerfile).
#
#   deploy/build-images.sh                 # base python:3.11-slim from a registry
#   deploy/build-images.sh --offline       # base localhost/biofp-base:bookworm (deploy/base-image.sh,
#                                          # built first if absent): no registry needed
#   BASE_IMAGE=registry.example/python:3.11-slim deploy/build-images.sh
#   TAG=0.1.0 SITE_IMAGE=biofp-site SERVER_IMAGE=biofp-server deploy/build-images.sh
#
# 1. deploy/wheelhouse.sh fills build/wheelhouse with this machine's pip (its own configuration:
#    pip.conf, PIP_* variables, local indexes and --find-links folders); TORCH_INDEX_URL names
#    another index for torch. The images install from those wheels only (--no-index).
# 2. The same two Dockerfiles are built with `docker build` when a Docker daemon answers, else
#    with `buildah bud` (vfs storage, chroot isolation: no daemon, no overlay, no user namespaces;
#    `--format docker` keeps HEALTHCHECK; `--layers` caches steps like Docker does).
#    BUILDER=docker|buildah forces one; STORAGE_DRIVER=overlay (where the kernel supports it)
#    makes buildah copy far less than vfs: a BioFP change rebuilds in seconds, not minutes.
# Prints the two image names and sizes at the end.
set -eu
cd "$(dirname "$0")/.."
offline=0
for arg in "$@"; do
    case "$arg" in
        --offline) offline=1 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "error: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done
TAG=${TAG:-latest}
SITE_IMAGE=${SITE_IMAGE:-localhost/biofp-site}:$TAG
SERVER_IMAGE=${SERVER_IMAGE:-localhost/biofp-server}:$TAG
OFFLINE_BASE=${BASE_TAG:-localhost/biofp-base:bookworm}
if [ -z "${BUILDER:-}" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then BUILDER=docker
    elif command -v buildah >/dev/null; then BUILDER=buildah
    else echo "error: no Docker daemon and no buildah (apt-get install -y buildah)" >&2; exit 1
    fi
fi
B="buildah --storage-driver ${STORAGE_DRIVER:-vfs}"
has_image() {
    if [ "$BUILDER" = docker ]; then docker image inspect "$1" >/dev/null 2>&1
    else $B inspect --type image "$1" >/dev/null 2>&1; fi
}
if [ $offline = 1 ]; then
    BASE_IMAGE=${BASE_IMAGE:-$OFFLINE_BASE}
    has_image "$BASE_IMAGE" || BASE_TAG=$BASE_IMAGE STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} \
        deploy/base-image.sh
fi
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}

deploy/wheelhouse.sh
# what the build stage installs, as build arguments: a changed wheel reruns its (cached) step
# (BioFP's own wheel is COPY'd into its stage: its bytes are that step's cache key)
DEPS_DIGEST=$(cd build/wheelhouse/deps \
    && { ls -l -- *.whl 2>/dev/null; cat requirements.txt install-venv.sh; } | sha256sum | cut -c1-16)

build() {  # build DOCKERFILE IMAGE
    echo "building $2 from $1 (base $BASE_IMAGE, $BUILDER)" >&2
    if [ "$BUILDER" = docker ]; then
        docker build -f "$1" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
            --build-arg "DEPS_DIGEST=$DEPS_DIGEST" \
            ${TORCH_INDEX_URL:+--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL"} -t "$2" .
    else
        $B bud --isolation chroot --format docker --layers -f "$1" \
            --build-arg "BASE_IMAGE=$BASE_IMAGE" \
            --build-arg "DEPS_DIGEST=$DEPS_DIGEST" \
            ${TORCH_INDEX_URL:+--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL"} -t "$2" .
    fi
}
build client/Dockerfile "$SITE_IMAGE"
build server/Dockerfile "$SERVER_IMAGE"
if [ "$BUILDER" = docker ]; then
    docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "biofp-(site|server)"
else
    $B images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -E "biofp-(site|server)"
fi
