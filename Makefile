# The two front-door commands are `make demo` and `make test`; each sets up .venv itself.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
# DVC runs each stage's `python stages/...` through the shell: put the venv first on PATH.
export PATH := $(BIN):$(PATH)

.PHONY: install test repro demo tensorboard bench clean

install: $(VENV)/.installed

# Re-installs whenever the dependency list or the pinned versions change.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

test: install
	$(BIN)/python -m pytest

repro: install
	$(BIN)/dvc repro

demo: install
	$(BIN)/reprotune demo

# Benchmarks print figures and write bench/results/ (never timed assertions in tests).
bench: install
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/training.py

tensorboard: install
	$(BIN)/tensorboard --logdir runs

clean:
	rm -rf $(VENV)
