# The README's two commands are `make train` and `make test`; both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fusedsae-installed

.PHONY: train test lint bench gpu-check gpu-check-dry clean

# csrc/ is compiled by the install (setup.py builds the CUDA extension when nvcc is found).
$(STAMP): setup.py pyproject.toml scripts/bootstrap.sh $(wildcard csrc/*)
	PYTHON=$(PYTHON) scripts/bootstrap.sh $(VENV)
	@touch $@

# Train a TopK SAE on the built-in toy-superposition data; prints the results table, writes runs/toy/*.png.
# --overwrite: the demo replaces its previous run in runs/toy (a plain `fusedsae train` refuses a folder holding
# another run).
train: $(STAMP)
	$(BIN)/fusedsae train --overwrite

# The whole test suite on the CPU (Triton kernels through TRITON_INTERPRET=1; GPU tests skip without CUDA).
test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/python -m ruff check python kernels tests benchmarks scripts setup.py
	$(BIN)/python -m ruff format --check python kernels tests benchmarks scripts setup.py

# Side-by-side measurements (not tests): CPU here; the docs/architecture.md#targets shapes on a GPU. --bench-save writes results/.
bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -q --benchmark-disable-gc $(BENCH_ARGS)

# The one-shot GPU check for a fresh H100/H200 (python3 with torch and triton, nvcc; no network): installs with the
# CUDA extension for sm_90, runs the GPU tests, the benchmark rows, the CUDA-graph step and the encoder
# configurations within 9 minutes, and writes benchmarks/results/gpu-check-<device>-<commit>.{json,md} (and $OUT).
gpu-check:
	scripts/gpu_check.sh

# The same script on the CPU (Triton's interpreter, tiny shapes): CI runs it so GPU minutes are never lost to a bug
# in the script. Report in build/gpu-check/.
gpu-check-dry: $(STAMP)
	PYTHON=$(BIN)/python scripts/gpu_check.sh --dry

clean:
	rm -rf $(VENV) build *.egg-info python/*.egg-info
