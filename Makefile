# Two entry points: `make demo` (install + score the embedded digits data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/influx-score --dataset digits --model mlp --out runs/digits-mlp

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check influx kernels tests benchmarks examples

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --suite persample

clean:
	rm -rf $(VENV) runs .pytest_cache
