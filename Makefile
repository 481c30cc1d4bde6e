# `make test` and `make demo` each build .venv on first use: torch==2.13.0 first (a local CPU wheel on our
# machines; a looser pin would download GBs of CUDA packages), then this project with its dev extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench nightly clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,plots]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/kv-cache demo --plot kv_cache_demo.png

lint: $(STAMP)
	$(VENV)/bin/ruff check kv_cache tests benchmarks scripts
	$(VENV)/bin/ruff format --check kv_cache tests benchmarks scripts
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(VENV)/bin/kv-cache bench --out bench_results

nightly: $(STAMP)
	HYPOTHESIS_PROFILE=nightly $(PY) -m pytest -q tests/reliability

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
