# The two front-door commands are `make demo` and `make test`; each sets up .venv itself.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
# DVC runs each stage's `python stages/...` through the shell: put the venv first on PATH.
export PATH := $(BIN):$(PATH)

.PHONY: install test test-fast repro demo experiments review tensorboard serve bench mutants gpu-wheels gpu-check clean

install: $(VENV)/.installed

# Re-installs whenever the dependency list or the pinned versions change.
$(VENV)/.installed: pyproject.toml constraints.txt
	@# pip --quiet prints nothing for minutes: say what is happening and for about how long.
	@echo "make install: setting up $(VENV) (torch, DVC, Ray, ONNX Runtime, ExecuTorch and the test tools);" \
	  "2-3 minutes on a fresh clone, quiet while pip works"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -c constraints.txt -e '.[test]'
	@# Byte-compile what pip installed on every core (pip does it file by file: about a minute on 2 cores).
	@# Not left to import time: with PYTHONDONTWRITEBYTECODE set, every process would recompile torch.
	@# A file that does not compile (a package's Python 2 test data) is skipped, as pip skips it.
	@echo "make install: byte-compiling what pip installed (about a minute on 2 cores)"
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@
	@echo "make install: done: $(VENV) is ready"

# Tests in tiers (docs/development/testing.md): markers say what a test needs beyond one process
# (dvc, ray, torchrun, gpu). `make test` (CI) runs them all, `make test-fast` (the edit loop) those
# that need none, on $(WORKERS) pytest-xdist workers (WORKERS=auto: one per core): each file's tests
# on one worker, the files with slow tests handed out first (tests/conftest.py orders them).
WORKERS ?= 2
PYTEST  := $(BIN)/python -m pytest -n $(WORKERS) --dist loadfile --no-loadscope-reorder
test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not dvc and not ray and not torchrun and not gpu"

repro: install
	$(BIN)/dvc repro

demo: install
	$(BIN)/reprotune demo

# Experiments side by side: name, params that differ, headline metrics
experiments: install
	$(BIN)/reprotune experiments

# What changed against a git revision, as Markdown: make review BASE=main
BASE ?= HEAD
review: install
	$(BIN)/reprotune review $(BASE)

# The exported model over the Open Inference Protocol (Ray Serve): http://127.0.0.1:8000/v2/models/reprotune
# Options after ARGS, e.g. make serve ARGS="--replicas 2 --threads 1"
ARGS ?=
serve: install
	$(BIN)/reprotune serve $(ARGS)

# Benchmarks print figures and write bench/results/ (never timed assertions in tests).
bench: install
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/training.py
	$(BIN)/python bench/serving.py

# Mutation testing (not part of `make test`; about an hour on 2 cores): mutmut mutates the modules
# listed in pyproject.toml's [tool.mutmut], runs the tests that own each, and bench/mutants.py
# prints the kill rate per module (bench/results/mutants.md).
mutants: install
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[mutation]'
	rm -rf mutants
	OMP_NUM_THREADS=1 $(BIN)/mutmut run || true
	$(BIN)/python bench/mutants.py

# For a lent GPU machine (no network, its own Python and torch): first, here, `make gpu-wheels`
# fetches the packages its image lacks into .whl/; there, `make gpu-check` (or bash bench/gpu_check.sh)
# runs the GPU tests and benchmark. See docs/how-to/gpus-and-clusters.md.
GPU_WHEELS := tensorboardX pydantic pydantic_core annotated-types typing-inspection typing_extensions
gpu-wheels:
	rm -rf .whl && $(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl \
	  $$(grep -iE '^($(shell echo $(GPU_WHEELS) | tr ' ' '|'))==' constraints.txt)

gpu-check:
	bash bench/gpu_check.sh

# Every experiment's runs side by side, plus the workspace's: http://127.0.0.1:6006
# TensorBoard's "TensorFlow installation not found" notice is expected: nothing here needs TensorFlow.
tensorboard: install
	$(BIN)/reprotune tensorboard

clean:
	rm -rf $(VENV)
