# Two commands: `make demo` and `make test`. Each sets up .venv when missing and is quick once set up.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Threads: 2-core machines train steadier with one intra-op thread per process.
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test test-gpu lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first: the local CPU wheel where one exists (pip's find-links), else pip's default build.
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q torch
	# Pin whatever torch is now installed, so no dependency can swap it for a multi-GB CUDA build.
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	# All cores: a demo machine is otherwise idle (tests keep one thread per process).
	OMP_NUM_THREADS=$$(nproc --all) $(VENV)/bin/toolkit train recipes/quickstart.yaml --overwrite

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

# On a machine with a CUDA GPU: vLLM's own checks, in a separate environment because vLLM brings its own CUDA
# build of torch and pins transformers (the CPU .venv stays as it is).
GPU_VENV ?= .venv-gpu
test-gpu:
	test -x $(GPU_VENV)/bin/python || python3 -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q -e '.[dev,gpu]'
	$(GPU_VENV)/bin/python -m pytest -q -m gpu -rs

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) bench/train_step.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
