"""What a cache hit costs on the SQL store, against a bare read of the same row.

For each database (SQLite in a temporary file, PostgreSQL on 127.0.0.1:5432, MariaDB on
127.0.0.1:3306; a namespace of its own, its rows deleted at the end) it prints the median cost
per call of:

- a bare ``SELECT value FROM cte_cache WHERE ...`` of the hit's row, through the store's own
  SQLAlchemy engine (one query round trip: the baseline);
- a local cache hit ``t(3)`` through the engine (its run record is written behind the caller);
- a local run without a cache, for the engine's own cost.

Cases run round-robin, so a busy machine slows them all alike. No assertions: a measurement.
The target is a hit within one query round trip + 50 µs.

    python bench/sql_store_costs.py [--calls 300] [--repeats 7] [--only sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import Celery
from sqlalchemy import select

from celery_taskengine import flush_run_records, task
from celery_taskengine._store import sql_schema
from celery_taskengine._store.selection import store_for_app
from celery_taskengine.cache_policies import INPUTS

URLS = {
    "sqlite": "sqlite:///{tmp}/bench.db",
    "postgresql": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "mariadb": "mysql+pymysql://root@127.0.0.1:3306/test",
}


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def measure(name: str, url: str, calls: int, repeats: int) -> list[tuple[str, float]]:
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    app = Celery(f"bench-{name}", set_as_current=False)
    app.conf.update(taskengine_store=url, taskengine_namespace=namespace)
    store: Any = store_for_app(app)

    def square(x: int) -> int:
        return x * x

    cached = task(app=app, name="bench.square", cache_policy=INPUTS)(square)
    plain = task(app=app, name="bench.plain")(square)
    cached(3)  # the record the hits read
    flush_run_records(app)
    key = store.iter_keys()[0]
    c = sql_schema.cache.c
    query = select(c.value).where(c.namespace == namespace, c.key == key)

    reader = store._reader  # the store's own autocommitting connections

    def bare_read() -> None:  # one round trip: no BEGIN, no ROLLBACK
        with reader.connect() as conn:
            conn.execute(query).scalar_one()

    cases = {"bare SELECT of the row": bare_read, "cache hit t(3)": lambda: cached(3)}
    cases["no cache: plain(3)"] = lambda: plain(3)
    samples: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(repeats):
        for case, fn in cases.items():
            samples[case].append(per_call_us(fn, calls))
        flush_run_records(app)
    _clean(store, namespace)
    return [(case, statistics.median(values)) for case, values in samples.items()]


def _clean(store: Any, namespace: str) -> None:
    with store.engine.begin() as conn:
        for table in sql_schema.METADATA.sorted_tables:
            conn.execute(table.delete().where(table.c.namespace == namespace))
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", default=",".join(URLS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'store':<12}{'case':<28}{'µs/call':>10}{'minus bare read':>18}")
        for name in args.only.split(","):
            rows = measure(name, URLS[name].format(tmp=tmp), args.calls, args.repeats)
            bare = rows[0][1]
            for case, us in rows:
                extra = "" if case.startswith("bare") else f"{us - bare:18.1f}"
                print(f"{name:<12}{case:<28}{us:10.1f}{extra}")


if __name__ == "__main__":
    main()
