# BioFP developer entry points. Every target creates .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean images images-offline

$(BIN)/biofp: pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0   # local CPU wheel: install it before anything pulls a CUDA build
	$(BIN)/pip install -q -e ".[test]"
	@touch $@

## run: install BioFP and run the main job: a federated DP simulation of 4 synthetic hospitals
run: $(BIN)/biofp
	$(BIN)/biofp simulate --out runs/default

## test: install BioFP with test dependencies and run lint + the whole test suite
test: $(BIN)/biofp
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q --durations=20

## images: the site and coordinator images (docker build with a Docker daemon, else buildah):
## base python:3.11-slim from a registry; dependencies from this machine's pip (deploy/)
images:
	deploy/build-images.sh

## images-offline: the same from a local Debian base (debootstrap), no container registry
images-offline:
	deploy/build-images.sh --offline

bench: $(BIN)/biofp
	$(BIN)/python bench/signals.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
