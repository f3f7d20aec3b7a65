# Two entry points: `make demo` (install the runtime dependencies + score the embedded digits data)
# and `make test` (install with the dev, bench and mnist extras + run the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUNTIME_STAMP := $(VENV)/.installed-runtime

.PHONY: demo test test-fast lint bench bench-micro results clean

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
	$(BIN)/influx-score --dataset digits --model mlp --flip-labels 0.1 --poison gaussian:0.02:0.3 --out runs/digits-mlp

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The fast lane while editing: every test but those marked slow (CI runs them all).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check influx kernels tests benchmarks examples

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --suite persample

# Kernel micro-benchmarks (pytest-benchmark); never part of `make test` (testpaths = tests).
bench-micro: $(STAMP)
	$(BIN)/python -m pytest benchmarks/micro --benchmark-only

# Every example result from a clean commit (each JSON records the commit and whether the tree was
# clean), on the CPU at the defaults (8 seeds, one thread each, two scripts at a time).
# gaussian_poisoning runs first: forgetting_audit and model_shift read the settings it chose.
EXAMPLES := forgetting_audit model_shift craft_unlearnable interlacing privacy influence_tails \
	ga_vs_gd commutation unlearning_cost
results: $(STAMP)
	@git diff --quiet HEAD -- . ':!examples/results' || { echo "commit first: results record the commit"; exit 2; }
	$(BIN)/python examples/gaussian_poisoning.py
	printf '%s\n' $(EXAMPLES) | xargs -P 2 -I{} $(BIN)/python examples/{}.py

clean:
	rm -rf $(VENV) runs .pytest_cache
