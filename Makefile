# Two entry points: `make demo` and `make test`. Each builds .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := requirements/constraints.txt

.PHONY: demo test test-all lint install clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(CONSTRAINTS) torch==2.13.0
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lora-cluster demo

lint: $(STAMP)
	$(BIN)/ruff check lora_cluster kernels deploy tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -m "not slow and not gpu and not multigpu" -q

test-all: lint
	$(BIN)/python -m pytest -m "not gpu and not multigpu" -q

clean:
	rm -rf $(VENV)
