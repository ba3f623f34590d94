# Two commands do all the set-up on a fresh machine (each installs what is missing first):
#   make quickstart   a real, small end-to-end `sana-ray apply` (local Ray, CPU, tiny model, MLflow on disk)
#   make test         the test suite
#
# TORCH_SPEC picks the torch build installed before everything else. The default is the CPU build
# (2.13.0); a GPU machine sets e.g. TORCH_SPEC="torch==2.13.0" TORCH_INDEX=<its CUDA wheel index>,
# or installs torch into .venv itself before running make.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.sana-ray-installed

.PHONY: install quickstart test test-fast ui clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, so nothing below pulls a multi-GB CUDA build on a CPU machine.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

quickstart: install
	$(VENV)/bin/sana-ray apply manifests/quickstart.yaml

test: install
	$(PY) -m pytest --durations=15

test-fast: install
	$(PY) -m pytest -m "not e2e"

ui: install
	$(VENV)/bin/sana-ray ui manifests/quickstart.yaml

clean:
	rm -rf runs
