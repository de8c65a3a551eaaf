# The commands of the README, each doing its own set-up in ./.venv:
#   make bench       the main job: benchmarks/bench_loss.py on this machine
#   make test        the test suite, plus the ahead-of-time GPU compile checks
#   make gpu-check   on a machine with a GPU: the GPU tests, the benchmark on the presets, one report
#   make mutate      mutation testing (slow, not part of CI): does the suite catch small realistic bugs?
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the CUDA toolkit prefix; torch's own guess (from the nvcc on PATH) can miss the libraries
export CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))

.PHONY: bench test gpu-check setup mutate
setup: $(STAMP)

$(STAMP): requirements-test.txt pyproject.toml setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade -r requirements-test.txt
	$(VENV)/bin/pip install --quiet --no-build-isolation -e .
	touch $@

bench: $(STAMP)
	$(PY) benchmarks/bench_loss.py $(ARGS)

# Exits 2 with a one-line reason without a GPU; else writes gpu_check_results/gpu_check.{json,md} (1 if anything
# is flagged).
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py $(ARGS)

# pytest (CPU; Triton under its interpreter, GPU-only tests skip), then the ahead-of-time checks that the GPU
# kernels compile without register spills or local memory (Triton for sm_80 and sm_90; the CUDA extension for every
# architecture of csrc/build_config.py, with shared memory within each one's limit).
test: $(STAMP)
	$(PY) -m pytest tests $(ARGS)
	$(PY) tools/compile_triton.py
	$(PY) tools/check_cuda_build.py

# Applies each mutant of tools/mutants.py to a scratch copy of the tree and runs the tests covering its file
# (docs/testing.md); ARGS="--only 'cpu-*'" for a subset, ARGS="--doc docs/testing.md" to record the result.
mutate: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) tools/mutate.py $(ARGS)
