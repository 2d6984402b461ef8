# `make demo` and `make test` work on a bare machine with Python >= 3.10 and pip.
# The CPU build of torch is pinned here (not in pyproject) so a GPU box keeps its own CUDA torch:
# when the base Python already has a CUDA-capable torch, the venv sees it and nothing replaces it.
# Its version is docker/Dockerfile's TORCH_VERSION (the one place torch is pinned; the image's base follows it).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_CPU := torch==$(shell sed -n 's/^ARG TORCH_VERSION=//p' docker/Dockerfile)

.PHONY: setup demo test test-fast lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-lock.txt docker/Dockerfile
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "using the CUDA torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q $(TORCH_CPU); \
	fi
	$(BIN)/pip install -q -c requirements-lock.txt -e ".[test]"
	@touch $@

demo: setup
	$(BIN)/sft launch

test: setup
	$(BIN)/python -m pytest -q

# The inner loop: everything but the slow, Docker, Slurm and GPU tests.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not docker and not slurm and not gpu"

lint: setup
	$(BIN)/ruff check launcher tests bench && $(BIN)/ruff format --check launcher tests bench

format: setup
	$(BIN)/ruff format launcher tests bench && $(BIN)/ruff check --fix launcher tests bench

clean:
	rm -rf $(VENV) runs .cache
