# The two commands of the README. Both create .venv and install everything; both are idempotent:
# the install step re-runs only when setup.cfg changes (the stamp file).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch first, pinned, so that a CPU-only machine takes the local CPU build and never pulls CUDA wheels.
# On a machine that already has a torch (a GPU node), `make` keeps it: see TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	bash deploy/install-test-deps.sh
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/phaselens demo

test: lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/python -m flake8 phaselens engine serving_shim kernels agent exporters dashboards advisor tests bench
	$(BIN)/python -m mypy phaselens engine serving_shim kernels agent exporters dashboards advisor

clean:
	rm -rf $(VENV) build *.egg-info
