# The README's two commands are `make train` and `make test`; both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fusedsae-installed

.PHONY: train test lint bench clean

# csrc/ is compiled by the install (setup.py builds the CUDA extension when nvcc is found).
$(STAMP): setup.py pyproject.toml scripts/bootstrap.sh $(wildcard csrc/*)
	PYTHON=$(PYTHON) scripts/bootstrap.sh $(VENV)
	@touch $@

# Train a TopK SAE on the built-in toy-superposition data; prints the results table, writes runs/toy/*.png.
train: $(STAMP)
	$(BIN)/fusedsae train

# The whole test suite on the CPU (Triton kernels through TRITON_INTERPRET=1; GPU tests skip without CUDA).
test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check python kernels tests benchmarks
	$(BIN)/ruff format --check python kernels tests benchmarks

# Side-by-side measurements (not tests): CPU here; the docs/architecture.md#targets shapes on a GPU. --bench-save writes results/.
bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -q --benchmark-disable-gc $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info python/*.egg-info
