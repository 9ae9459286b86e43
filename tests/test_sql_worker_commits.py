"""A worker on a database backend: what an engine delivery commits, and what it waits for.

Commits are what a database worker waits for. A plain Celery task costs its delivery one
(its result); an engine task must cost no more (its Running record is written behind it, its
outcome commits with Celery's result), without giving up what the records promise: the
outcome and Celery's result agree, Running shows while the attempt runs, and a delivery that
lost its claim stores neither. Celery's in-thread worker on the real broker and databases
(SQLite on a file, PostgreSQL, MariaDB), so the commits can be counted by thread.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_taskengine import get_task_run, task
from tests.test_store_contract import MARIADB_URL, POSTGRES_URL, _sql_store
from tests.workers import embedded_worker

pytestmark = pytest.mark.timeout(120)

sqlalchemy = pytest.importorskip("sqlalchemy")


class Commits:
    """Committed transactions of every SQLAlchemy engine in this process, by thread."""

    def __init__(self) -> None:
        self.by_thread: dict[int, int] = {}
        self._lock = threading.Lock()

    def __call__(self, _conn: Any) -> None:
        ident = threading.get_ident()
        with self._lock:
            self.by_thread[ident] = self.by_thread.get(ident, 0) + 1

    def of(self, thread: int) -> int:
        with self._lock:
            return self.by_thread.get(thread, 0)


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = {
        "sqlite": f"sqlite:///{tmp_path / 'results.db'}",
        "postgresql": POSTGRES_URL,
        "mariadb": MARIADB_URL,
    }[request.param]
    _sql_store(url, "probe").close()  # reachable (fails in CI if not), tables made
    return url


@pytest.fixture
def commits() -> Iterator[Commits]:
    counter = Commits()
    sqlalchemy.event.listen(sqlalchemy.Engine, "commit", counter)
    yield counter
    sqlalchemy.event.remove(sqlalchemy.Engine, "commit", counter)


@pytest.fixture
def app(redis_url: str, database: str) -> Iterator[Celery]:
    app = Celery(f"commits-{uuid.uuid4().hex[:8]}", broker=redis_url, backend=f"db+{database}")
    app.conf.update(
        taskengine_namespace=f"c{uuid.uuid4().hex[:12]}",
        task_serializer="json",
        result_serializer="json",
        broker_connection_retry_on_startup=True,
    )
    yield app
    app.close()


def _delivery_threads(app: Celery) -> tuple[Any, Any, Any, list[int]]:
    """A plain task, an engine task and a slow engine task; each notes its delivery's thread."""
    threads: list[int] = []

    @app.task(name=f"{app.main}.plain")
    def plain(i: int) -> int:
        threads.append(threading.get_ident())
        return i

    @task(app=app, name=f"{app.main}.engine")
    def engine(i: int) -> int:
        threads.append(threading.get_ident())
        return i

    @task(app=app, name=f"{app.main}.slow")
    def slow(seconds: float) -> str:
        time.sleep(seconds)
        return "slept"

    return plain, engine, slow, threads


def test_an_engine_delivery_waits_for_no_more_commits_than_a_plain_tasks(
    app: Celery, commits: Commits
) -> None:
    plain, engine, _, threads = _delivery_threads(app)
    with embedded_worker(app):
        for kind in (plain, engine):  # warm up: tables, connections
            kind.delay(0).get(timeout=30, interval=0.01)
        per_task = {}
        for kind in (plain, engine):
            thread = threads[-1]
            before = commits.of(thread)
            ids = [kind.delay(i).id for i in range(10)]
            for i, task_id in enumerate(ids):
                assert app.AsyncResult(task_id).get(timeout=30, interval=0.01) == i
            assert set(threads[-10:]) == {thread}  # one delivery thread (solo pool)
            per_task[kind.name] = (commits.of(thread) - before) / 10
        for task_id in ids:  # the engine's records agree with Celery's result
            run = get_task_run(task_id, app=app)
            assert run is not None and run.state is not None
            assert run.state.is_completed()
    assert per_task[plain.name] >= 1
    assert per_task[engine.name] <= per_task[plain.name]


def test_running_shows_in_the_record_and_the_backend_while_the_attempt_runs(app: Celery) -> None:
    _, _, slow, _ = _delivery_threads(app)
    with embedded_worker(app):
        slow.delay(0).get(timeout=30, interval=0.01)  # warm up: tables, connections
        result = slow.delay(2.0)
        seen_run, seen_status = None, None
        deadline = time.monotonic() + 1.8
        while time.monotonic() < deadline and (seen_run is None or seen_status is None):
            run = get_task_run(result.id, app=app)
            if run is not None and run.state is not None and run.state.is_running():
                seen_run = run
            if result.state == "RUNNING":
                seen_status = "RUNNING"
            time.sleep(0.05)
        assert seen_run is not None, "no Running record while the attempt ran"
        assert seen_status == "RUNNING"
        assert result.get(timeout=30, interval=0.01) == "slept"
        run = get_task_run(result.id, app=app)
        assert run is not None and run.state is not None and run.state.is_completed()
        assert result.state == "SUCCESS"


def test_a_delivery_that_lost_its_claim_stores_neither_its_outcome_nor_celerys_result(
    app: Celery, database: str
) -> None:
    from celery_taskengine._store import sql_schema
    from celery_taskengine._store.selection import store_for_app

    store: Any = store_for_app(app)

    @task(app=app, name=f"{app.main}.taken_over")
    def taken_over() -> str:
        run_id = str(taken_over.request.id)
        time.sleep(0.3)  # the attempt's Running record (and its claim) are written meanwhile
        # Another delivery takes the message over while this attempt runs; this one learns it
        # only from its outcome's write, which Celery's result rides with.
        row = {
            "namespace": store.namespace,
            "key": f"{run_id}:0",
            "holder": "another-delivery",
            "expires_at": time.time() + 60,
        }
        with store.engine.begin() as conn:
            table = sql_schema.claims
            c = table.c
            conn.execute(
                sqlalchemy.delete(table).where(c.namespace == row["namespace"], c.key == row["key"])
            )
            conn.execute(table.insert(), row)
        return "mine"

    with embedded_worker(app):
        result = taken_over.delay()
        time.sleep(1.5)
        assert result.state != "SUCCESS"  # Celery stored nothing for this delivery
        run = get_task_run(result.id, app=app)
        assert run is None or run.state is None or not run.state.is_final()


def test_an_outcome_celery_stores_no_result_for_is_written_after_the_delivery(
    app: Celery,
) -> None:
    @task(app=app, name=f"{app.main}.unkept")
    def unkept() -> int:
        # Celery decides at the end whether to store: the outcome cannot ride with a result.
        unkept.request.ignore_result = True
        return 7

    with embedded_worker(app):
        result = unkept.delay()
        deadline = time.monotonic() + 20
        run = None
        while time.monotonic() < deadline:
            run = get_task_run(result.id, app=app)
            if run is not None and run.state is not None and run.state.is_final():
                break
            time.sleep(0.05)
    assert run is not None and run.state is not None
    assert run.state.is_completed()
    assert result.state == "PENDING"  # Celery stored nothing, as asked
