"""What ``runs ls --task T --state S --limit 20`` costs as the number of runs grows.

For each store (PostgreSQL on 127.0.0.1:5432, SQLite in a temporary file, Redis on
127.0.0.1:6379 db 13; a namespace of its own, removed at the end) it fills in 10^4, 10^5 and
10^6 runs (``--sizes``) of ten tasks in four states, and prints the median time of listing the
newest 20 runs of one task in one state, of one task, and of all. A listing that reads an
index costs about the same at every size; one that scans grows with the runs.

    python bench/runs_listing.py [--sizes 10000,100000,1000000] [--only postgresql,redis]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from celery_taskengine._store.redis_store import RedisStore
from celery_taskengine.states import Completed, Failed, Pending, Running, TimedOut
from celery_taskengine.task_run import TaskRun

STATES = [Completed(data=1), Failed(message="boom"), TimedOut(message="slow"), Running()]
BATCH = 5_000


def make_run(i: int) -> TaskRun:
    state = STATES[i % len(STATES)]
    history = [Pending(), Running(), state] if state.name != "Running" else [Pending(), state]
    return TaskRun(
        id=f"{i:08d}-{uuid.uuid4().hex[:8]}",
        name=f"t{i % 10}-{i}",
        task_name=f"bench.tasks.t{i % 10}",
        run_count=1,
        state=history[-1],
        state_history=history,
    )


def fill(save_many: Callable[[list[TaskRun]], None], start: int, stop: int) -> None:
    for offset in range(start, stop, BATCH):
        save_many([make_run(i) for i in range(offset, min(offset + BATCH, stop))])


def timed_ms(fn: Callable[[], Any], repeats: int = 7) -> float:
    samples = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) * 1000)
    return statistics.median(samples)


def sql_store(url: str) -> Any:
    from celery_taskengine._store.sql_store import SqlStore

    return SqlStore.from_url(url, namespace=f"ls{uuid.uuid4().hex[:8]}", run_expires=None)


def redis_store(url: str) -> Any:
    store = RedisStore(redis.Redis.from_url(url), namespace=f"ls{uuid.uuid4().hex[:8]}")

    def save_many(runs: list[TaskRun]) -> None:
        for run in runs:
            store.save_run(run)

    store.save_runs = getattr(store, "save_runs", save_many)
    return store


def analyze(name: str, store: Any) -> None:
    """Fresh planner statistics, as autovacuum keeps them on a live database."""
    if name == "postgresql":
        from sqlalchemy import text

        with store.engine.begin() as conn:
            conn.execute(text("ANALYZE cte_runs"))


def clean(name: str, store: Any) -> None:
    if name == "redis":
        client = store.client
        for key in client.scan_iter(match=f"cte:{store.namespace}:*", count=10_000):
            client.delete(key)
        return
    from celery_taskengine._store import sql_schema

    with store.engine.begin() as conn:
        for table in sql_schema.METADATA.sorted_tables:
            conn.execute(table.delete().where(table.c.namespace == store.namespace))
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--only", default="postgresql,sqlite,redis")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        urls = {
            "postgresql": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
            "sqlite": f"sqlite:///{tmp}/runs.db",
            "redis": "redis://127.0.0.1:6379/13",
        }
        print(f"{'store':<12}{'runs':>10}{'task+state ms':>15}{'task ms':>10}{'all ms':>10}")
        for name in args.only.split(","):
            store = redis_store(urls[name]) if name == "redis" else sql_store(urls[name])
            filled = 0
            try:
                for size in sizes:
                    fill(store.save_runs, filled, size)
                    filled = size
                    analyze(name, store)
                    both = timed_ms(lambda s=store: s.list_runs(20, task="t3", state="failed"))
                    one = timed_ms(lambda s=store: s.list_runs(20, task="t3"))
                    every = timed_ms(lambda s=store: s.list_runs(20))
                    print(f"{name:<12}{size:>10}{both:>15.2f}{one:>10.2f}{every:>10.2f}")
            finally:
                clean(name, store)


if __name__ == "__main__":
    main()
