# The targets a newcomer guesses. `make demo` and `make test` set everything up themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
# A pinned CPU-or-CUDA build is the platform's choice; this one is tested (see docs/benchmarks.md).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)  ## the whole system once: embedded Redis, a worker, PNGs in ./sdq-output
	$(VENV)/bin/sdq demo

test: $(STAMP)  ## the whole suite against real redis-server, an S3 API server and the tiny model
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check sdqueue tests bench
	$(VENV)/bin/ruff format --check sdqueue tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) sdq-output .pytest_cache .mypy_cache .ruff_cache
