# tokenfactory — the two commands of the README are `make demo` and `make test`.
# `make setup` is idempotent: the venv is rebuilt only when pyproject.toml changes.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokenfactory-installed
# Debian packages the project needs: the real Fashion-MNIST garments for the embedded default, and a real
# headless browser (Chromium + its WebDriver) for the GAIR studio's page test.
APT_PACKAGES := dataset-fashion-mnist chromium chromium-driver

.PHONY: setup test demo serve apt clean-venv gpu-check pretrain-gpu

setup: apt $(STAMP)

# apt is skipped when every package is already installed, so repeated runs stay fast and offline.
apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	  else \
	    echo "warning: apt-get not found; install$$missing yourself (see README: 'Without apt')"; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

# Format and lint first (ruff, configured in pyproject.toml): `ruff format .` and `ruff check --fix .` repair both.
test: setup
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m pytest

demo: setup
	$(VENV)/bin/tokenfactory demo

# The demo, keeping its service (and embedded S3) up on http://127.0.0.1:8000 until Ctrl-C.
serve: setup
	$(VENV)/bin/tokenfactory demo --keep-serving

# On a CUDA machine: the `cuda` tests and the GPU benchmark, JSON + log under build/gpu_check/ (under 8 minutes
# on one H200); elsewhere its CPU smoke mode. `bash benchmarks/gpu_check.sh --download-wheels` first, here,
# fetches the wheels a GPU machine without network needs (see the script).
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

# Pretrain fashion-mini from scratch on one GPU in about 8 minutes (docs/pretrain-gpu.md; step counts from
# benchmarks/pretrain_flops.py, an estimate made on a CPU). Writes $(PRETRAIN_GPU_OUT): model.safetensors, logs,
# embedded_quality.json.
PRETRAIN_GPU_OUT ?= build/fashion-mini-gpu
pretrain-gpu: setup
	$(VENV)/bin/tokenfactory pretrain --stage clip --use-gpu --precision bf16 --out $(PRETRAIN_GPU_OUT) \
	  --clip-steps 1600 --batch-size 1024 --group-size 4 --checkpoint-every 100 --max-minutes 3.75
	$(VENV)/bin/tokenfactory pretrain --stage unet --use-gpu --precision bf16 --out $(PRETRAIN_GPU_OUT) \
	  --unet-steps 4100 --batch-size 256 --checkpoint-every 400 --max-minutes 3.75
	$(PY) benchmarks/embedded_quality.py --weights $(PRETRAIN_GPU_OUT)/model.safetensors \
	  --out $(PRETRAIN_GPU_OUT)/embedded_quality.json

clean-venv:
	rm -rf $(VENV)
