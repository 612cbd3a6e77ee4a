# Everything runs from a virtual environment inside the repo.
# TORCH_SPEC pins torch before the project's `train` extra is resolved, so that `torch>=2.3` installs
# nothing more. The default takes the local CPU build on the project's CI machines; on a GPU machine
# the same pin from PyPI is the CUDA build, or override it, e.g.
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install install-serve test test-all lint serve bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[serve,train,dev]'
	touch $@

# A serving-only environment: no torch, no dev tools (what `make serve` runs from).
SERVE_VENV ?= $(VENV)-serve

install-serve: $(SERVE_VENV)/.installed

$(SERVE_VENV)/.installed: pyproject.toml
	python3 -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install -q --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install -q -e '.[serve,redis]'
	touch $@

test: install
	$(PY) -m pytest -q

# Includes the long runs marked `slow`.
test-all: install
	$(PY) -m pytest -q -m ''

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

serve: install-serve
	$(SERVE_VENV)/bin/blda serve --host $(HOST) --port $(PORT)

bench: install
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(SERVE_VENV) .pytest_cache .mypy_cache .ruff_cache
