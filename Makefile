# Two commands do all set-up on a fresh machine:
#   make demo   runs the quickstart
#   make test   installs everything and runs lint, types and the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m celery_taskengine demo

lint: $(STAMP)
	$(VENV)/bin/ruff check celery_taskengine tests bench examples
	$(VENV)/bin/ruff format --check celery_taskengine tests bench examples
	$(VENV)/bin/mypy --strict celery_taskengine

test: $(STAMP) lint
	./scripts/ensure-services
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	./scripts/ensure-services
	$(PY) bench/engine_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
