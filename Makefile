# Two commands for a newcomer (Python 3.9+ and a C++ compiler; nothing else needed):
#
#   make test    .venv + torch + tools (once), the extension, the CMake target + ctest, pytest
#   make demo    eNTK kernel regression on scikit-learn's digits
#
# Other targets: build (extension + CMake target), bench, clean, distclean.
# Knobs: PYTHON (interpreter for the venv), CUDA=1|0 (require the CUDA kernels; 0 on a
# machine without nvcc), MAX_JOBS (compile jobs), PYTEST_ARGS, BENCH_ARGS.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MAX_JOBS ?= 2
# CI must notice a silently dropped CUDA build: by default the build requires the CUDA
# kernels (it fails with the reason when torch or nvcc cannot build them), and the tests
# check they were compiled in. CUDA=0 builds and expects the CPU kernels only.
CUDA ?= 1
EXPECT_BUILD := $(if $(filter 1,$(CUDA)),cuda,cpp)
export MAX_JOBS
# The venv's tools (ninja for torch's extension build, cmake) come first on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)

# torch 2.14.1 is the CUDA 13.0 build (a local wheel on the project's machines): the
# CUDA sources compile and link against it even with no GPU.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# traker and laplace-torch: the compat adapters are tested against the real libraries
# (pure Python wheels, about 3 s to install with their dependencies).
TOOLS := numpy tqdm safetensors scikit-learn matplotlib pytest ninja cmake "setuptools>=64" wheel transformers==5.24.0 timm==1.0.31 traker==0.3.2 laplace-torch==0.3

DEPS_STAMP := $(VENV)/.tangent-kernels-deps
EXT_STAMP := build/.extension-built
CMAKE_DIR := build/cmake
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h')

.PHONY: test build extension cmake ctest pytest demo bench clean distclean

test: ctest pytest

build: extension cmake

# --- environment: created once; dependencies reinstalled when pyproject.toml changes ---
$(PY):
	$(PYTHON) -m venv $(VENV)

# --no-cache-dir: the venv alone is ~6 GB (torch's CUDA build); a copy of every downloaded
# wheel in pip's cache on top of it once ran a CI machine out of disk.
$(DEPS_STAMP): pyproject.toml Makefile | $(PY)
	$(PIP) install --no-cache-dir $(TORCH_PINS) $(TOOLS)
	touch $@

# --- the extension tangent_kernels._C (editable install: _C lands beside the sources) ---
extension: $(EXT_STAMP)

$(EXT_STAMP): $(DEPS_STAMP) setup.py pyproject.toml $(CSRC)
	TANGENT_KERNELS_CUDA=$(CUDA) $(PIP) install --no-build-isolation --no-deps -e .
	@mkdir -p $(@D) && touch $@

# --- the CMake target and its C++ test (ninja rebuilds only what changed) ---
$(CMAKE_DIR)/build.ninja: | $(DEPS_STAMP)
	cmake -S . -B $(CMAKE_DIR) -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY))

cmake: $(CMAKE_DIR)/build.ninja
	cmake --build $(CMAKE_DIR) -j $(MAX_JOBS)

ctest: cmake
	ctest --test-dir $(CMAKE_DIR) --output-on-failure

# --- pytest ---
# Exit code 5 means pytest collected no tests. With the default arguments that means the
# suite is missing or broken, and CI must not pass on nothing: fail. With PYTEST_ARGS
# (e.g. -k) it only means nothing matched the selection: say so and succeed.
pytest: $(EXT_STAMP)
	@set +e; \
	TANGENT_KERNELS_EXPECT_BUILD=$(EXPECT_BUILD) TRITON_INTERPRET=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then \
	  if [ -z "$(strip $(PYTEST_ARGS))" ]; then \
	    echo "make: pytest collected no tests (exit 5): the test suite is missing; failing" >&2; exit 1; \
	  fi; \
	  echo "make: no test matched PYTEST_ARGS='$(PYTEST_ARGS)' (pytest exit 5); nothing to run" >&2; exit 0; \
	fi; \
	exit $$rc

demo: $(EXT_STAMP)
	$(PY) -m tangent_kernels demo

# Each benchmark script in bench/, with BENCH_ARGS (e.g. BENCH_ARGS=--help), then the
# per-op microbenchmarks (pytest-benchmark). The baselines' packages are installed here,
# not for `make test`: Opacus (bench_transformers.py) and pytest-benchmark.
BENCH_TOOLS := opacus==1.6.0 pytest-benchmark
bench: $(EXT_STAMP)
	$(PIP) install -q $(BENCH_TOOLS)
	@set -e; for script in bench/bench_*.py; do \
	  echo "== $$script $(BENCH_ARGS)"; $(PY) $$script $(BENCH_ARGS); \
	done
	$(PY) -m pytest bench/ --benchmark-only -q

clean:
	rm -rf build dist *.egg-info tangent_kernels/_C*.so
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
