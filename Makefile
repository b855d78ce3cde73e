# Two commands do all the set-up: `make run` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test install install-dev bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,gpu,ref]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## The main job: five systems (conf/experiment/compare.yaml) on the embedded default workload, a table and a chart.
run: $(VENV)/.installed
	$(BIN)/dlora-sim --multirun experiment=compare

## The test suite (CPU only; Triton kernels run under TRITON_INTERPRET=1).
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/sim_speed.py

clean:
	rm -rf $(VENV) outputs multirun
