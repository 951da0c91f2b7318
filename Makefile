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

.PHONY: setup test demo serve apt clean-venv

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

test: setup
	$(PY) -m pytest

demo: setup
	$(VENV)/bin/tokenfactory demo

# The demo, keeping its service (and embedded S3) up on http://127.0.0.1:8000 until Ctrl-C.
serve: setup
	$(VENV)/bin/tokenfactory demo --keep-serving

clean-venv:
	rm -rf $(VENV)
