# Two commands do all set-up on a fresh machine:
#   make demo   runs the quickstart
#   make test   installs everything and runs lint, types and the test suite, then the store
#               tests again on the oldest redis-py pyproject.toml allows (a venv of their own)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The redis-py floor: the last 5.0.x, the oldest line pyproject's `redis>=5.0` admits (Celery
# 5.5's redis extra caps redis at 5.2.1: `make test-redis-floor REDIS_FLOOR=5.2.1` tries that).
REDIS_FLOOR ?= 5.0.8
FLOOR_VENV := .venv-redis-floor
FLOOR_STAMP := $(FLOOR_VENV)/.installed-redis-$(REDIS_FLOOR)
# The store layer's tests: the Redis ones run over RESP2 and RESP3 (tests/conftest.py).
STORE_TESTS := tests/test_redis_store.py tests/test_local_recording.py tests/test_early_read.py \
	tests/test_memory_store.py tests/test_store_contract.py tests/test_layers.py tests/test_wire.py

.PHONY: demo test test-suite test-redis-floor fault-matrix celery-suite soak lint bench bench-deployments clean

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

$(FLOOR_STAMP): pyproject.toml
	test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install --quiet -e '.[test]' 'redis==$(REDIS_FLOOR)'
	rm -f $(FLOOR_VENV)/.installed-redis-*
	touch $@

test: test-suite test-redis-floor

# The suite's tests mostly wait on workers and servers: three pytest processes share the two
# cores (one file per process at a time: a file's fixtures and servers stay together).
PYTEST_WORKERS ?= 3

test-suite: $(STAMP) lint
	./scripts/ensure-services
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The store tests on redis-py $(REDIS_FLOOR), RESP2 and RESP3; the newest redis-py is .venv's.
test-redis-floor: $(FLOOR_STAMP)
	./scripts/ensure-services
	$(FLOOR_VENV)/bin/python -c 'import redis; print("redis-py", redis.__version__)'
	$(FLOOR_VENV)/bin/python -m pytest -q -p no:cacheprovider $(STORE_TESTS)

# Every pool x task kind x Redis fault (tests/reliability/test_fault_matrix.py); CI runs a slice.
fault-matrix: $(STAMP)
	./scripts/ensure-services
	FAULT_MATRIX=full $(PY) -m pytest -q tests/reliability/test_fault_matrix.py $(PYTEST_ARGS)

# Celery's own integration tests (t/integration/test_tasks.py, test_canvas.py of the installed
# Celery, from its sdist) with engine tasks and with plain tasks, on Redis and RabbitMQ + Redis;
# CI runs a slice (tests/celery_suite/).
# Its four parts (engine and plain tasks, Redis and RabbitMQ brokers) run at once: each mostly
# waits on its worker (about 20 minutes together, 80 one after another); -rP prints each
# part's counts.
celery-suite: $(STAMP)
	./scripts/ensure-services
	CELERY_SUITE=full $(PY) -m pytest -q -rP -n 4 -p no:cacheprovider tests/celery_suite/test_celery_suite.py $(PYTEST_ARGS)

# The soak tests at full size (the normal run keeps them small: SOAK_RUNS=2000).
soak: $(STAMP)
	./scripts/ensure-services
	SOAK_RUNS=20000 LEAK_SOAK_THREADS=10000 $(PY) -m pytest -q -m soak $(PYTEST_ARGS)

bench: $(STAMP)
	./scripts/ensure-services
	$(PY) bench/engine_overhead.py

# Per store, in one run: a cache hit against a bare read, worker throughput against plain
# Celery on the same result backend, and `runs ls` at 10^4, 10^5 and 10^6 runs (README).
BENCH_BACKENDS := db+postgresql+psycopg://postgres@127.0.0.1/test \
	db+mysql+pymysql://root@127.0.0.1:3306/test
bench-deployments: $(STAMP)
	./scripts/ensure-services
	$(PY) bench/cache_costs.py
	$(PY) bench/sql_store_costs.py --only sqlite,postgresql,mariadb
	$(PY) bench/bridge_throughput.py --tasks 2000 --round-trips 100
	set -e; for backend in $(BENCH_BACKENDS) "db+sqlite:///$$(mktemp -d)/results.db"; do \
		echo "== $$backend"; \
		$(PY) bench/bridge_throughput.py --backend "$$backend" --tasks 1000 --round-trips 50; \
	done
	$(PY) bench/runs_listing.py --sizes 10000,100000,1000000 --only redis,postgresql,sqlite

clean:
	rm -rf $(VENV) $(FLOOR_VENV) .pytest_cache .mypy_cache .ruff_cache
