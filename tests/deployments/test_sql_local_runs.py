"""Local runs on a SQL store: cached across processes, records written behind the caller and
confirmed by ``flush_run_records()``, refusals reported by run id (real PostgreSQL, SQLite)."""

from __future__ import annotations

import logging
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from celery import Celery

from celery_taskengine import flush_run_records, get_task_run, task
from celery_taskengine._store.selection import store_for_app
from celery_taskengine.cache_policies import INPUTS
from celery_taskengine.task_engine import run_task_sync
from tests.multiprocessing_children import run_children
from tests.test_store_contract import POSTGRES_URL, _sql_store

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'engine.db'}" if request.param == "sqlite" else POSTGRES_URL
    _sql_store(url, "probe").close()  # reachable, tables made
    return url


def _app(url: str, namespace: str) -> Celery:
    app = Celery("cte-sql-local", set_as_current=False)
    app.conf.update(taskengine_store=url, taskengine_namespace=namespace)
    return app


def test_a_local_cached_run_is_a_hit_in_another_process_and_its_record_is_shared(
    store_url: str,
) -> None:
    namespace = f"n{uuid.uuid4().hex[:10]}"
    app = _app(store_url, namespace)
    calls: list[int] = []

    @task(app=app, name="sql.square", cache_policy=INPUTS)
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    run_id = uuid.uuid4().hex
    run_task_sync(square, run_id, parameters={"x": 4}, return_type="state")
    assert flush_run_records(app)

    script = f"""
from celery import Celery
from celery_taskengine import get_task_run, task
from celery_taskengine.cache_policies import INPUTS
from celery_taskengine.task_engine import run_task_sync
app = Celery("other", set_as_current=False)
app.conf.update(taskengine_store={store_url!r}, taskengine_namespace={namespace!r})
@task(app=app, name="sql.square", cache_policy=INPUTS)
def square(x):
    raise AssertionError("ran again in another process")
print(square(4, return_state=True).name)
print(get_task_run({run_id!r}, app=app).history_names())
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout.splitlines()

    assert calls == [4]
    assert out == ["Cached", "['Pending', 'Running', 'Completed']"]


def test_records_of_multiprocessing_children_reach_the_database(store_url: str) -> None:
    namespace = f"n{uuid.uuid4().hex[:10]}"
    run_ids = [uuid.uuid4().hex for _ in range(5)]
    run_children({"taskengine_store": store_url, "taskengine_namespace": namespace}, run_ids)

    app = _app(store_url, namespace)
    store = store_for_app(app)
    loaded = [store.load_run(str(run_id)) for run_id in run_ids]
    assert [run.history_names()[-1] if run else None for run in loaded] == ["Completed"] * 5


def test_a_database_that_refuses_the_records_is_reported_with_the_run_ids(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    admin = _sql_store(POSTGRES_URL, "probe")
    with admin.engine.begin() as conn:
        conn.execute(
            sqlalchemy.text(
                "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cte_reader') "
                "THEN CREATE ROLE cte_reader LOGIN; END IF; END $$"
            )
        )
        conn.execute(sqlalchemy.text("GRANT SELECT ON ALL TABLES IN SCHEMA public TO cte_reader"))
    admin.close()
    reader_url = POSTGRES_URL.replace("postgres@", "cte_reader@")
    app = _app(reader_url, f"n{uuid.uuid4().hex[:10]}")

    @task(app=app, name="sql.refused")
    def refused() -> int:
        return 1

    with caplog.at_level(logging.ERROR):
        run_id = uuid.uuid4().hex
        state = run_task_sync(refused, run_id, return_type="state")
        written = flush_run_records(app)

    assert state.is_completed()  # the run's own outcome is unchanged
    assert not written
    assert run_id in written.lost_runs
    assert any(run_id in record.getMessage() for record in caplog.records)
    assert get_task_run(run_id, app=app) is not None  # still in this process's memory
