# Two entry points: `make demo` (install the runtime dependencies + score the embedded digits data)
# and `make test` (install with the dev, bench and mnist extras + run the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUNTIME_STAMP := $(VENV)/.installed-runtime

.PHONY: demo test lint bench bench-micro clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev,bench,mnist]"
	touch $(STAMP)

# The demo needs only influx's runtime dependencies (no test tools, no benchmark peers).
$(RUNTIME_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e .
	touch $(RUNTIME_STAMP)

demo: $(RUNTIME_STAMP)
	$(BIN)/influx-score --dataset digits --model mlp --out runs/digits-mlp

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check influx kernels tests benchmarks examples

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --suite persample

# Kernel micro-benchmarks (pytest-benchmark); never part of `make test` (testpaths = tests).
bench-micro: $(STAMP)
	$(BIN)/python -m pytest benchmarks/micro --benchmark-only

clean:
	rm -rf $(VENV) runs .pytest_cache
