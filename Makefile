# stream-adapt: `make demo` runs the service end to end on an embedded default; `make test` runs everything CI runs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip
STAMP  := $(VENV)/.installed

.PHONY: install test unit integration lint typecheck demo bench schemas clean

install: $(STAMP)

# Reinstall when the dependency declarations change. The constraints file pins torch to the
# 2.13.0 CPU build, so pip never pulls a multi-GB CUDA wheel.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check --upgrade pip
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check stream_adapt tests benchmarks

typecheck: install
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider

unit: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

integration: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/integration

demo: install
	$(BIN)/stream-adapt demo

bench: install
	$(BIN)/python benchmarks/bench_adapt.py --json bench-adapt.json
	$(BIN)/python benchmarks/bench_pipeline.py --json bench-pipeline.json

schemas: install
	$(BIN)/stream-adapt schemas export schemas

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info demo-out
