#!/bin/sh
# Fill the build context's wheelhouse (build/wheelhouse) with the pip of THIS machine, as it is
# configured (pip.conf, /etc/xdg/pip, PIP_* variables: a local index, --find-links folders, a
# proxy, PyPI). The image build then installs from these files only (`pip install --no-index`),
# so it needs no network and no pip configuration of its own.
#
#   build/wheelhouse/deps/   torch (CPU) and every third-party wheel BioFP needs, resolved once
#                            from requirements.txt: pyproject.toml's dependencies with Flower's
#                            `simulation` extra dropped (Ray: only `biofp simulate` uses it, and
#                            no container runs a simulation)
#   build/wheelhouse/biofp/  BioFP itself, rebuilt from the source tree on every run
#
#   deploy/wheelhouse.sh                       # both
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu deploy/wheelhouse.sh   # torch from there
#   PYTHON=/usr/bin/python3.11 deploy/wheelhouse.sh     # the pip that resolves (default: python3.11)
#
# The wheels must suit the image's Python: CPython 3.11 on x86_64 Linux (both base images).
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
OUT=${WHEELHOUSE:-build/wheelhouse}
command -v "$PYTHON" >/dev/null || { echo "error: $PYTHON not found (set PYTHON=...)" >&2; exit 1; }
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null \
    || { echo "error: $PYTHON is not CPython 3.11, the images' Python" >&2; exit 1; }
mkdir -p "$OUT/deps" "$OUT/biofp"
rm -f "$OUT"/biofp/*.whl
touch "$OUT/deps/.keep" "$OUT/biofp/.keep"
# BioFP's own wheel: the same bytes for the same sources (fixed timestamps), so that the image
# build's cached step is reused until a source file changes
SOURCE_DATE_EPOCH=315532800 \
    "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$OUT/biofp" .
# what the images install: pyproject.toml's dependencies without Flower's `simulation` extra
"$PYTHON" - "$TORCH_VERSION" >"$OUT/deps/requirements.new" <<'PY'
import re, sys, tomllib
print(f"torch=={sys.argv[1]}")
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    print(re.sub(r"^flwr\[simulation\]", "flwr", dep))
PY
stamp="$OUT/deps/.resolved-for"
want="$(sha256sum "$OUT/deps/requirements.new" | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && [ -f "$OUT/deps/requirements.txt" ]; then
    echo "wheelhouse: deps unchanged ($want)" >&2
    rm -f "$OUT/deps/requirements.new"
else
    rm -f "$OUT"/deps/*.whl
    mv "$OUT/deps/requirements.new" "$OUT/deps/requirements.txt"
    # torch first, alone: from TORCH_INDEX_URL if given, else from pip's configured sources
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$OUT/deps" \
        ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
    # everything else, torch pinned to the wheel above (it satisfies the requirement offline)
    "$PYTHON" -m pip wheel --quiet --wheel-dir "$OUT/deps" --find-links "$OUT/deps" \
        -r "$OUT/deps/requirements.txt"
    echo "$want" >"$stamp"
fi
cp deploy/install-venv.sh "$OUT/deps/install-venv.sh"  # the images' install steps
n=$(ls "$OUT"/deps/*.whl | wc -l)
echo "wheelhouse: $n dependency wheels ($(du -sh "$OUT/deps" | cut -f1)) + $(ls "$OUT"/biofp/)" >&2
