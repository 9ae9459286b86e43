"""A SQL store's cache hit in two checkouts, measured in pairs: a before/after in one run.

As ``bench/ab_paired.py`` does for Redis: one serving process per checkout (this file with
``--serve``, run by ``--python`` with ``PYTHONPATH=<tree>``, so each imports its own
``celery_taskengine``) answers slices of calls of a case, the order of the two sides flipped
every round. Each slice reports the calling thread's CPU time per call (``time.thread_time``:
what the caller's thread spends, not the write-behind thread's batch writes nor the wait for
the database) and its wall-clock time. Per database (SQLite in a temporary file, PostgreSQL on
127.0.0.1:5432, MariaDB on 127.0.0.1:3306; a namespace per process, its rows deleted at the
end) the cases are a bare ``SELECT`` of the hit's row on the store's own autocommitting
connections, through SQLAlchemy and through the driver's cursor (one round trip and nothing
around it: the baselines), a local cache hit ``t(3)``, and the same hit with run records off.
Printed: each side's median, the median of the per-pair ratios B/A, and each side's hits minus
each baseline (``-sa``, ``-drv``; medians). No assertions: this is a measurement.

    python bench/ab_sql_paired.py --before ../wt-before --after . [--rounds 30] [--calls 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

URLS = {
    "sqlite": "sqlite:///{tmp}/ab.db",
    "postgresql": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "mariadb": "mysql+pymysql://root@127.0.0.1:3306/test",
}
KINDS = (
    "SELECT via SQLAlchemy",
    "SELECT via the driver",
    "cache hit t(3)",
    "hit, no run records",
)


def square(x: int) -> int:
    return x * x


def _cases(name: str, url: str) -> tuple[list[Callable[[], Any]], Callable[[], None]]:
    """The calls of :data:`KINDS` on one database, and what deletes its rows."""
    from celery import Celery
    from sqlalchemy import select

    from celery_taskengine import flush_run_records, task
    from celery_taskengine._store import sql_schema
    from celery_taskengine._store.selection import store_for_app
    from celery_taskengine.cache_policies import INPUTS
    from celery_taskengine.task_engine import local_environment

    namespace = f"ab{os.getpid()}{name[:3]}"
    app = Celery(f"ab-{name}", set_as_current=False)
    app.conf.update(taskengine_store=url, taskengine_namespace=namespace)
    store: Any = store_for_app(app)
    cached = task(app=app, name="ab.square", cache_policy=INPUTS)(square)
    quiet = cached.with_options()
    local_environment(quiet, None).record = None
    cached(3)
    flush_run_records(app)
    c = sql_schema.cache.c
    query = select(c.value).where(c.namespace == namespace, c.key == store.iter_keys()[0])
    reader = store._reader

    def bare_read() -> None:
        with reader.connect() as conn:
            conn.execute(query).scalar_one()

    compiled = query.compile(dialect=reader.dialect)
    params = compiled.construct_params()
    bound = tuple(params[n] for n in compiled.positiontup or ()) if compiled.positional else params

    def driver_read() -> None:  # one round trip, nothing around it: no ROLLBACK (pymysql)
        connection = reader.raw_connection()
        cursor = connection.cursor()
        cursor.execute(compiled.string, bound)
        cursor.fetchone()
        cursor.close()
        connection.close()

    def clean() -> None:
        flush_run_records(app)
        with store.engine.begin() as conn:
            for table in sql_schema.METADATA.sorted_tables:
                conn.execute(table.delete().where(table.c.namespace == namespace))
        store.close()

    return [bare_read, driver_read, lambda: cached(3), lambda: quiet(3)], clean


def serve(names: list[str]) -> None:
    """Answer ``<case index> <calls>`` lines with CPU and wall µs per call, until stdin closes."""
    import celery_taskengine

    print(f"serving {celery_taskengine.__file__}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        calls: list[Callable[[], Any]] = []
        cleanups = []
        for name in names:
            cases, clean = _cases(name, URLS[name].format(tmp=tmp))
            calls += cases
            cleanups.append(clean)
        for call in calls:
            call()
        try:
            for line in sys.stdin:
                index, count = map(int, line.split())
                cpu, wall = _slice(calls[index], count)
                print(cpu / count * 1e6, wall / count * 1e6, flush=True)
        finally:
            for clean in cleanups:
                clean()


def _slice(call: Callable[[], Any], count: int) -> tuple[float, float]:
    cpu, wall = time.thread_time(), time.perf_counter()
    for _ in range(count):
        call()
    return time.thread_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--before", type=Path)
    parser.add_argument("--after", type=Path)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--only", default=",".join(URLS))
    options = parser.parse_args()
    names = options.only.split(",")
    if options.serve:
        serve(names)
        return
    if options.before is None or options.after is None:
        parser.error("--before and --after are required")
    trees = [options.before.resolve(), options.after.resolve()]
    sides = [_start(options.python, tree, options.only) for tree in trees]
    try:
        print(f"A (before): {trees[0]}\nB (after):  {trees[1]}")
        print(f"{options.rounds} pairs of {options.calls} calls per case, µs per call (medians)\n")
        for measure, column in (("CPU of the calling thread", 0), ("wall clock", 1)):
            print(f"{measure}:")
            print(
                f"{'case':<36} {'A':>8} {'B':>8} {'B/A':>6} {'A-sa':>8} {'B-sa':>8}"
                f" {'A-drv':>8} {'B-drv':>8}"
            )
            for position, name in enumerate(names):
                _report(sides, name, position, options, column)
            print()
    finally:
        for side in sides:
            assert side.stdin is not None
            side.stdin.close()
            side.wait(timeout=60)


def _report(
    sides: list[subprocess.Popen[str]], name: str, position: int, options: Any, column: int
) -> None:
    """One line per case; the hits also minus each read (SQLAlchemy's, then the driver's)."""
    medians = []
    for offset, kind in enumerate(KINDS):
        a, b = _pairs(sides, position * len(KINDS) + offset, options.rounds, options.calls)
        a, b = [s[column] for s in a], [s[column] for s in b]
        ratio = statistics.median(y / x for x, y in zip(a, b, strict=True))
        med = (statistics.median(a), statistics.median(b))
        medians.append(med)
        extra = ""
        if offset >= 2:
            extra = "".join(
                f" {med[0] - base[0]:>8.1f} {med[1] - base[1]:>8.1f}" for base in medians[:2]
            )
        print(f"{name + ': ' + kind:<36} {med[0]:>8.1f} {med[1]:>8.1f} {ratio:>6.3f}{extra}")


def _start(python: str, tree: Path, only: str) -> subprocess.Popen[str]:
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.Popen(
        [python, str(Path(__file__).resolve()), "--serve", "--only", only],
        cwd=tree,
        env=environment,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _pairs(
    sides: list[subprocess.Popen[str]], case: int, rounds: int, calls: int
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """``rounds`` slices of ``case`` on each side, the order flipped every round."""
    samples: tuple[list[tuple[float, float]], list[tuple[float, float]]] = ([], [])
    for round_ in range(rounds):
        for side in (0, 1) if round_ % 2 == 0 else (1, 0):
            process = sides[side]
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(f"{case} {calls}\n")
            process.stdin.flush()
            cpu, wall = map(float, process.stdout.readline().split())
            samples[side].append((cpu, wall))
    return samples


if __name__ == "__main__":
    main()
