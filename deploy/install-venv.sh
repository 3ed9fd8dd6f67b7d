#!/bin/sh
# The install steps of both images (client/Dockerfile, server/Dockerfile). deploy/wheelhouse.sh
# copies this script to build/wheelhouse/deps/, and each Dockerfile runs it from there.
#
#   install-venv.sh deps DIGEST   stage `deps`: /opt/venv with the dependencies, from
#                                 /wheels/deps (bind-mounted: no layer keeps the wheels) with
#                                 --no-index; only when it holds no wheel, its requirements.txt
#                                 from the image's own pip index (PyPI unless configured; torch
#                                 from TORCH_INDEX_URL when given). Then the trim: headers,
#                                 protoc, every tests/ folder, pip (setuptools stays: torch
#                                 declares it).
#   install-venv.sh biofp         stage `biofp`: BioFP alone from /wheels/biofp/*.whl, no
#                                 dependencies, under the prefix /opt/biofp (lib/python3.11/
#                                 site-packages/ and bin/, scripts starting #!/opt/venv/bin/python3):
#                                 the image copies it over /opt/venv as its last, small layer.
#
# DIGEST (build-images.sh passes it as a build argument) names the wheels installed: a changed one
# reruns the step, as a changed COPY source would. TORCH_VERSION and TORCH_INDEX_URL are the
# Dockerfiles' build arguments.
set -eu
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
echo "wheelhouse $1 ${2:-}"
case "$1" in
deps)
    python3 -m venv /opt/venv
    if ls /wheels/deps/*.whl >/dev/null 2>&1; then
        /opt/venv/bin/pip install --no-index --no-deps /wheels/deps/*.whl
    else
        # torch alone first, so that nothing pulls another build of it
        /opt/venv/bin/pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
            "torch==${TORCH_VERSION}"
        /opt/venv/bin/pip install -r /wheels/deps/requirements.txt
    fi
    sp=/opt/venv/lib/python3.11/site-packages
    rm -rf "$sp"/torch/include "$sp"/torch/share/cmake "$sp"/torch/bin/protoc* \
        "$sp"/pyarrow/include "$sp"/pyarrow/src "$sp"/numpy/_core/include
    find "$sp" -type d -name tests -prune -exec rm -rf {} +
    /opt/venv/bin/python -m pip uninstall --quiet --yes pip
    ;;
biofp)
    # a throwaway venv at the image's path, for its pip and its interpreter's name in the scripts
    python3 -m venv /opt/venv
    /opt/venv/bin/pip install --quiet --no-index --no-deps --prefix /opt/biofp /wheels/biofp/*.whl
    rm -rf /opt/venv
    head -1 /opt/biofp/bin/biofp
    ;;
*)
    echo "usage: install-venv.sh deps DIGEST | biofp" >&2
    exit 2
    ;;
esac
