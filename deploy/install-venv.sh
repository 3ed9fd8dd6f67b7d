#!/bin/sh
# The build stage of both images (client/Dockerfile, server/Dockerfile): /opt/venv from the
# wheelhouse. deploy/wheelhouse.sh copies this script to build/wheelhouse/deps/, and each Dockerfile
# runs it from there, bind-mounted (no layer holds the wheelhouse or the script).
#
#   install-venv.sh deps DIGEST    the dependencies: from /wheels/deps with --no-index; only when
#                                  it holds no wheel, torch from the image's own pip index (PyPI
#                                  unless configured, TORCH_INDEX_URL when given)
#   install-venv.sh biofp DIGEST   BioFP itself, then the trim: headers, protoc, every tests/
#                                  folder, pip and wheel (setuptools stays: torch declares it)
#
# DIGEST (build-images.sh passes it as a build argument) names what is installed: a changed one
# reruns the step, as a changed COPY source would. TORCH_VERSION and TORCH_INDEX_URL are the
# Dockerfiles' build arguments.
set -eu
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
echo "wheelhouse $1 ${2:-?}"
case "$1" in
deps)
    python3 -m venv /opt/venv
    if ls /wheels/deps/*.whl >/dev/null 2>&1; then
        /opt/venv/bin/pip install --no-index --no-deps /wheels/deps/*.whl
    else
        /opt/venv/bin/pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
            "torch==${TORCH_VERSION}"
    fi
    ;;
biofp)
    offline=
    if ls /wheels/deps/*.whl >/dev/null 2>&1; then offline="--no-index --no-deps"; fi
    /opt/venv/bin/pip install $offline /wheels/biofp/*.whl
    sp=/opt/venv/lib/python3.11/site-packages
    rm -rf "$sp"/torch/include "$sp"/torch/share/cmake "$sp"/torch/bin/protoc* \
        "$sp"/pyarrow/include "$sp"/pyarrow/src "$sp"/numpy/_core/include
    find "$sp" -type d -name tests -prune -exec rm -rf {} +
    /opt/venv/bin/python -m pip uninstall --quiet --yes pip wheel
    ;;
*)
    echo "usage: install-venv.sh deps|biofp DIGEST" >&2
    exit 2
    ;;
esac
