# Two commands do all the set-up: `make run` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Where no NVIDIA GPU is found, torch comes first from PyTorch's CPU wheel index (--index-url, as PyTorch's
# install guide gives it; its dependencies then come from PyPI with the extras, which keep this build): the
# pin alone would resolve to a CUDA build and its nvidia-* packages. TORCH is the pin of pyproject.toml's extras (tests/test_docs.py checks they agree).
TORCH := torch==2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
CPU_TORCH := $(if $(shell command -v nvidia-smi 2>/dev/null),@true,$(BIN)/pip install -q --no-deps "$(TORCH)" --index-url $(TORCH_CPU_INDEX))

.PHONY: run test install install-dev install-runtime install-cluster install-server install-bench bench compile clean

# The optional compiled build of the simulator's hot modules (dlora_sim/compiled.py): rebuilt when its sources
# changed; where it cannot be built the simulator runs as pure Python, with the same results.
# (DLORA_SIM_PURE: the builder's own import of dlora_sim does not warn about the build it is replacing)
COMPILE = DLORA_SIM_PURE=1 $(BIN)/python -m dlora_sim.mypyc_build || echo "make: continuing with the pure-Python simulator"

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[compiled]'
	touch $@

$(VENV)/.installed-runtime: pyproject.toml Makefile | $(BIN)/python
	$(CPU_TORCH)
	$(BIN)/pip install -q -e '.[gpu]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-cluster: pyproject.toml Makefile | $(BIN)/python
	$(CPU_TORCH)
	$(BIN)/pip install -q -e '.[gpu,cluster]'
	touch $@ $(VENV)/.installed $(VENV)/.installed-runtime

$(VENV)/.installed-server: pyproject.toml Makefile | $(BIN)/python
	$(CPU_TORCH)
	$(BIN)/pip install -q -e '.[gpu,server,bench]'
	touch $@ $(VENV)/.installed $(VENV)/.installed-runtime $(VENV)/.installed-bench

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[bench]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-dev: pyproject.toml Makefile | $(BIN)/python
	$(CPU_TORCH)
	$(BIN)/pip install -q -e '.[dev,compiled,gpu,ref,cluster,server,bench]'
	touch $@ $(VENV)/.installed $(VENV)/.installed-runtime $(VENV)/.installed-cluster $(VENV)/.installed-server \
		$(VENV)/.installed-bench

install: $(VENV)/.installed
## The runtime (dlora-serve, dlora-calibrate, dlora-validate): the gpu extra, CPU torch where no GPU is found.
install-runtime: $(VENV)/.installed-runtime
## The runtime with its replicas as Ray actors (and Hydra's Ray launcher for sweeps on the same cluster).
install-cluster: $(VENV)/.installed-cluster
## dlora-server (the runtime behind the OpenAI API) and dlora-bench (CPU torch where no GPU is found).
install-server: $(VENV)/.installed-server
## dlora-bench alone: the load generator, for any OpenAI-compatible server (no torch).
install-bench: $(VENV)/.installed-bench
install-dev: $(VENV)/.installed-dev

## The main job: does merging pay? five systems, four cases (conf/experiment/compare.yaml), a verdict per case.
run: $(VENV)/.installed
	$(COMPILE)
	$(BIN)/dlora-sim --multirun experiment=compare

## The test suite (CPU only; Triton kernels run under TRITON_INTERPRET=1).
test: $(VENV)/.installed-dev
	$(COMPILE)
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	$(COMPILE)
	$(BIN)/python benchmarks/sim_speed.py

## (Re)build the compiled simulator modules if their sources changed (`make run` and `make test` do it too).
compile: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[compiled]'
	DLORA_SIM_PURE=1 $(BIN)/python -m dlora_sim.mypyc_build

clean:
	rm -rf $(VENV) outputs multirun dlora_sim/_compiled dlora_sim/_compiled.lock
