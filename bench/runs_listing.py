"""What ``runs ls --task T --state S --limit 20`` costs as the number of runs grows.

For each store it fills in 10^4, 10^5 and 10^6 runs (``--sizes``) of ten tasks in four
states, one every 10 ms of the last hours, and prints the median time of the store's
``list_runs`` for the newest 20 runs of one task in one state, of one task, and of all. A
listing that reads an index costs about the same at every size; one that scans grows with
the runs. At the largest size it also times the command line itself,
``celery-taskengine -A app runs ls --task t3 --state failed --limit 20``: in-process (parse,
find the app, list, print; the app keeps its store between calls) and as a subprocess,
against ``runs show <unknown id>`` (the same start-up, app and store, then one read) and
``--help`` (the interpreter and imports alone).

Each store lives where nothing else does: Redis is a ``redis-server`` of the run's own on a
free port, PostgreSQL a schema of its own (dropped at the end), SQLite a temporary file.
The runs are written in bulk (Redis pipelines, PostgreSQL ``COPY``, SQLite ``executemany``),
but each record is built by the store's own encoder, key and index entries (Redis) or row
builder (SQL); before timing, one seeded run is written again through the store's
``save_run`` and must come out identical.

    python bench/runs_listing.py [--sizes 10000,100000,1000000] [--only redis,postgresql]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.services import POSTGRES_URL, postgres_schema, private_redis  # noqa: E402
from celery_taskengine._engine.task_run import TaskRun  # noqa: E402
from celery_taskengine.states import (  # noqa: E402
    Completed,
    Failed,
    Pending,
    Running,
    State,
    TimedOut,
)

NAMESPACE = "benchls"
STATES = [Completed(data=1), Failed(message="boom"), TimedOut(message="slow"), Running()]
#: Runs per bulk write: a Redis pipeline of twice as many commands, one COPY or executemany.
BATCH = 2_000
#: Seeded runs are this far apart (the newest is about now).
STEP = timedelta(milliseconds=10)
MS = timedelta(milliseconds=1)
LISTINGS: dict[str, dict[str, str]] = {
    "task+state": {"task": "t3", "state": "failed"},
    "task": {"task": "t3"},
    "all": {},
}
CLI_ARGS = ["runs", "ls", "--task", "t3", "--state", "failed", "--limit", "20"]


def make_run(i: int, base: datetime) -> TaskRun:
    """Run ``i``: task ``t<i % 10>``, one of four final or running states, at ``base + i
    steps``."""
    moment = base + i * STEP
    last = replace(STATES[i % len(STATES)], timestamp=moment)
    history: list[State] = [replace(Pending(), timestamp=moment - 3 * MS)]
    if last.name != "Running":
        history.append(replace(Running(), timestamp=moment - 2 * MS))
    history.append(last)
    return TaskRun(
        id=f"{i:08d}-run",
        name=f"t{i % 10}-{i}",
        task_name=f"bench.tasks.t{i % 10}",
        run_count=1,
        state=last,
        state_history=history,
    )


class RedisSeeder:
    """A private ``redis-server``; each run's SET and index script as ``save_run`` sends
    them, a few thousand commands per pipeline."""

    name = "redis"

    def __init__(self, url: str) -> None:
        import redis

        from celery_taskengine._store.redis_store import RedisStore
        from celery_taskengine._store.run_index import INDEX_LUA

        self.url = f"{url}/0"
        self.client = redis.Redis.from_url(self.url)
        self.store = RedisStore(self.client, namespace=NAMESPACE)
        self._sha = self.client.script_load(INDEX_LUA)

    def write(self, runs: list[TaskRun]) -> None:
        from celery_taskengine._store.run_document import encode_run

        expires = self.store.run_expires
        px = None if expires is None else max(1, math.ceil(expires * 1000))  # as save_run
        pipe = self.client.pipeline(transaction=False)
        for run in runs:
            keys, args = self.store.index_keys_and_args(run)
            pipe.set(self.store.key_for("run", run.id), encode_run(run), px=px)
            pipe.evalsha(self._sha, len(keys), *keys, *args)
        pipe.execute()

    def written(self, run: TaskRun) -> Any:
        """What the store holds for ``run``: its document and its index scores."""
        keys, _ = self.store.index_keys_and_args(run)
        scores = [self.client.zscore(key, run.id) for key in keys[:3]]
        return self.client.get(self.store.key_for("run", run.id)), scores

    def app_config(self) -> dict[str, Any]:
        return {"result_backend": self.url, "taskengine_namespace": NAMESPACE}

    def finish(self) -> None:
        self.client.close()


class SqlSeeder:
    """A SQL store's ``cte_runs`` rows, built by the store's own row builder."""

    def __init__(self, name: str, url: str) -> None:
        from celery_taskengine._store.sql_store import SqlStore

        self.name = name
        self.url = url
        self.store = SqlStore.from_url(url, namespace=NAMESPACE)
        self.store.create_tables()

    def rows(self, runs: list[TaskRun]) -> list[dict[str, Any]]:
        return [
            {"namespace": NAMESPACE, "run_id": run.id, **self.store._run_values(run)}
            for run in runs
        ]

    def write(self, runs: list[TaskRun]) -> None:
        from celery_taskengine._store import sql_schema

        with self.store.engine.begin() as conn:
            conn.execute(sql_schema.runs.insert(), self.rows(runs))

    def written(self, run: TaskRun) -> Any:
        """The run's row, but for ``expires_at`` (it follows the clock at each write)."""
        from sqlalchemy import select

        from celery_taskengine._store import sql_schema

        c = sql_schema.runs.c
        query = select(sql_schema.runs).where(c.namespace == NAMESPACE, c.run_id == run.id)
        with self.store.engine.connect() as conn:
            row = conn.execute(query).one()._asdict()
        row.pop("expires_at")
        return row

    def settle(self) -> None:
        """Fresh planner statistics, as autovacuum keeps them on a live database."""
        from sqlalchemy import text

        with self.store.engine.begin() as conn:
            conn.execute(text("ANALYZE cte_runs"))

    def app_config(self) -> dict[str, Any]:
        return {"taskengine_store": self.url, "taskengine_namespace": NAMESPACE}

    def finish(self) -> None:
        self.store.close()


class PostgresSeeder(SqlSeeder):
    """The rows go in with ``COPY`` (the fastest bulk load PostgreSQL has)."""

    def write(self, runs: list[TaskRun]) -> None:
        rows = self.rows(runs)
        columns = list(rows[0])
        raw = self.store.engine.raw_connection()
        try:
            with raw.cursor() as cursor:  # type: ignore[attr-defined]
                copy = f"COPY cte_runs ({', '.join(columns)}) FROM STDIN"
                with cursor.copy(copy) as stream:
                    for row in rows:
                        stream.write_row([row[name] for name in columns])
            raw.commit()
        finally:
            raw.close()


@contextmanager
def seeders(names: list[str]) -> Iterator[Iterator[Any]]:
    """The stores asked for, each in a place of its own, cleaned up however the run ends."""
    with contextlib.ExitStack() as stack:

        def each() -> Iterator[Any]:
            for name in names:
                if name == "redis":
                    seeder: Any = RedisSeeder(stack.enter_context(private_redis()))
                elif name == "postgresql":
                    url = stack.enter_context(postgres_schema(POSTGRES_URL))
                    seeder = PostgresSeeder(name, url)
                elif name == "sqlite":
                    tmp = stack.enter_context(tempfile.TemporaryDirectory())
                    seeder = SqlSeeder(name, f"sqlite:///{tmp}/runs.db")
                else:
                    raise SystemExit(f"unknown store {name!r}: redis, postgresql or sqlite")
                stack.callback(seeder.finish)
                yield seeder

        yield each()


def fill(seeder: Any, start: int, stop: int, base: datetime) -> float:
    """Seed runs ``start`` to ``stop``; the seconds it took."""
    begin = time.perf_counter()
    for offset in range(start, stop, BATCH):
        seeder.write([make_run(i, base) for i in range(offset, min(offset + BATCH, stop))])
    return time.perf_counter() - begin


def check_same_as_store(seeder: Any, base: datetime) -> None:
    """A seeded run, written again by ``save_run``, must come out as it was seeded."""
    run = make_run(3, base)
    seeded = seeder.written(run)
    seeder.store.save_run(run)
    if seeder.written(run) != seeded:
        raise SystemExit(f"{seeder.name}: the seeded run differs from what save_run writes")


def timed_ms(fn: Callable[[], Any], repeats: int = 9) -> float:
    fn()  # warm: connections, statements, planner caches
    samples = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) * 1000)
    return statistics.median(samples)


def listing_times(store: Any) -> dict[str, float]:
    times = {}
    for label, filters in LISTINGS.items():
        found = store.list_runs(20, **filters)
        if len(found) != 20:
            raise SystemExit(f"{label}: listed {len(found)} runs, not 20")
        times[label] = timed_ms(lambda f=filters: store.list_runs(20, **f))
    return times


def cli_times(seeder: Any, workdir: Path) -> dict[str, float]:
    """``runs ls`` through the command line: in-process and as a subprocess (ms)."""
    from celery_taskengine._tools import cli

    module = workdir / "bench_ls_app.py"
    module.write_text(
        "from celery import Celery\n"
        f"app = Celery('bench_ls')\napp.conf.update({seeder.app_config()!r})\n"
    )
    sys.path.insert(0, str(workdir))
    argv = ["-A", "bench_ls_app:app", *CLI_ARGS]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        in_process = timed_ms(lambda: cli.main(argv), repeats=5)
    if out.getvalue().count("bench.tasks.t3") != 20 * 6:
        raise SystemExit(f"{seeder.name}: the command line did not list 20 runs")
    sys.path.remove(str(workdir))
    sys.modules.pop("bench_ls_app", None)
    env = {**os.environ, "PYTHONPATH": f"{workdir}{os.pathsep}{ROOT}"}
    command = [sys.executable, "-m", "celery_taskengine"]

    commands = {
        "ls": argv,
        # The same start-up, app and store, then one run read: what `ls` costs beyond it.
        "show": [*argv[:2], "runs", "show", "no-such-run"],
        "help": ["--help"],  # the interpreter and imports alone
    }
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(7):  # round-robin, so a busy machine slows each alike
        for name, args in commands.items():
            begin = time.perf_counter()
            subprocess.run(
                [*command, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            samples[name].append((time.perf_counter() - begin) * 1000)
    times = {name: statistics.median(values) for name, values in samples.items()}
    return {"in-process": in_process, **times}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--only", default="redis,postgresql")
    parser.add_argument("--no-cli", action="store_true", help="skip the command-line timing")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    base = datetime.now(timezone.utc) - sizes[-1] * STEP
    header = f"{'store':<12}{'runs':>10}{'seed s':>9}"
    print(header + "".join(f"{label + ' ms':>16}" for label in LISTINGS), flush=True)
    cli_rows = []
    with seeders(args.only.split(",")) as stores, tempfile.TemporaryDirectory() as tmp:
        for seeder in stores:
            filled = 0
            for size in sizes:
                seconds = fill(seeder, filled, size, base)
                filled = size
                getattr(seeder, "settle", lambda: None)()
                if size == sizes[0]:
                    check_same_as_store(seeder, base)
                times = listing_times(seeder.store)
                row = f"{seeder.name:<12}{size:>10}{seconds:>9.1f}"
                print(row + "".join(f"{t:>16.2f}" for t in times.values()), flush=True)
            if not args.no_cli:
                cli_rows.append((seeder.name, filled, cli_times(seeder, Path(tmp))))
    for name, size, t in cli_rows:
        print(
            f"{name}, {size} runs, `celery-taskengine -A app {' '.join(CLI_ARGS)}`: "
            f"in-process {t['in-process']:.1f} ms; as a subprocess {t['ls']:.0f} ms, against "
            f"`runs show <unknown id>` {t['show']:.0f} ms (ls - show = "
            f"{t['ls'] - t['show']:.0f} ms) and `--help` {t['help']:.0f} ms"
        )


if __name__ == "__main__":
    main()
