"""Processes that first use a SQL store on a new database at the same moment all get its tables.

Two worker processes starting together race to create the tables: the loser's ``CREATE``
once failed the first operation it made (SQLite: "database is locked" or "no such table";
PostgreSQL: a duplicate key in its catalog), so a run's outcome could go unwritten.
"""

from __future__ import annotations

import multiprocessing
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_store_contract import POSTGRES_URL, _sql_store

pytestmark = [pytest.mark.timeout(180)]

TRIALS = 3


def _first_use(url: str, barrier: Any, errors: Any) -> None:
    from celery_taskengine._store.sql_store import SqlStore

    store = SqlStore.from_url(url, namespace="first-use")
    barrier.wait()
    try:
        store.load_run("missing")
        store.write(f"k{uuid.uuid4().hex}", 1, serializer="json", expires_in=60)
        store.list_runs(5)
    except Exception as exc:  # reported to the test
        errors.put(f"{type(exc).__name__}: {exc}")
    finally:
        store.close()


def _race(url: str) -> list[str]:
    # spawned, not forked: a fork of this test process (threads of earlier tests holding
    # locks) can hang in the child
    context = multiprocessing.get_context("spawn")
    barrier, errors = context.Barrier(2), context.Queue()
    procs = [context.Process(target=_first_use, args=(url, barrier, errors)) for _ in range(2)]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join(timeout=60)
            assert proc.exitcode == 0
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
    found = []
    while not errors.empty():
        found.append(errors.get())
    return found


@pytest.fixture
def fresh_postgres_schema() -> Iterator[Callable[[], str]]:
    """A function making a new, empty PostgreSQL schema, and its URL; all dropped afterwards."""
    _sql_store(POSTGRES_URL, "probe").close()  # reachable (fails in CI if not)
    import psycopg

    admin = psycopg.connect("host=127.0.0.1 user=postgres dbname=test", autocommit=True)
    made: list[str] = []

    def make() -> str:
        name = f"cte_first_{uuid.uuid4().hex[:10]}"
        admin.execute(f"CREATE SCHEMA {name}")  # type: ignore[arg-type]
        made.append(name)
        return f"{POSTGRES_URL}?options=-csearch_path%3D{name}"

    try:
        yield make
    finally:
        for name in made:
            admin.execute(f"DROP SCHEMA {name} CASCADE")  # type: ignore[arg-type]
        admin.close()


def test_two_processes_on_a_new_sqlite_file_both_get_the_tables(tmp_path: Path) -> None:
    for trial in range(TRIALS):
        assert _race(f"sqlite:///{tmp_path / f'new-{trial}.db'}") == []


def test_two_processes_on_a_new_postgresql_schema_both_get_the_tables(
    fresh_postgres_schema: Callable[[], str],
) -> None:
    for _ in range(TRIALS):
        assert _race(fresh_postgres_schema()) == []
