"""A batch through a real worker on Celery's database backend while the database keeps killing
the worker's connections: no run lost, every record agrees with Celery's result, no body runs
twice (the SQL counterpart of the Redis fault matrix's ``CLIENT KILL``).

The worker's connections are told apart from everyone else's by a PostgreSQL
``application_name`` or a MariaDB user of their own, so the test kills only them.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from celery_taskengine import get_task_run
from tests.deployments.workers import _output, deployment_worker
from tests.test_store_contract import MARIADB_URL, POSTGRES_URL, _sql_store

pytestmark = [pytest.mark.timeout(240)]

RUNS = 16
#: How long the database keeps killing the worker's connections, and how often.
FAULT_SECONDS, EVERY = 3.0, 0.3
_USER = "cte_fault"


def _postgresql() -> tuple[str, Callable[[], int]]:
    import psycopg

    name = f"cte-fault-{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect("host=127.0.0.1 user=postgres dbname=test", autocommit=True)
    query = (
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s"
    )

    def kill() -> int:
        row = admin.execute(query, (name,)).fetchone()  # type: ignore[arg-type]
        return int(row[0]) if row else 0

    return f"{POSTGRES_URL}?application_name={name}", kill


def _mariadb() -> tuple[str, Callable[[], int]]:
    import pymysql

    admin = pymysql.connect(host="127.0.0.1", user="root", database="test", autocommit=True)
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE USER IF NOT EXISTS '{_USER}'@'%' IDENTIFIED BY ''")
        cursor.execute(f"GRANT ALL PRIVILEGES ON test.* TO '{_USER}'@'%'")

    def kill() -> int:
        with admin.cursor() as cursor:
            cursor.execute("SELECT id FROM information_schema.processlist WHERE user = %s", _USER)
            ids = [row[0] for row in cursor.fetchall()]
            for connection_id in ids:
                with contextlib.suppress(pymysql.MySQLError):  # it ended meanwhile
                    cursor.execute(f"KILL {int(connection_id)}")
        return len(ids)

    return MARIADB_URL.replace("root@", f"{_USER}@"), kill


@pytest.fixture(
    params=[("postgresql", "prefork"), ("postgresql", "threads"), ("mariadb", "prefork")],
    ids=lambda param: "-".join(param),
)
def faulted(request: pytest.FixtureRequest) -> Iterator[tuple[str, Callable[[], int], str]]:
    database, pool = request.param
    _sql_store(POSTGRES_URL if database == "postgresql" else MARIADB_URL, "probe").close()
    url, kill = _postgresql() if database == "postgresql" else _mariadb()
    yield url, kill, pool


def test_a_batch_through_killed_database_connections_loses_no_run_and_runs_none_twice(
    redis_url: str, faulted: tuple[str, Callable[[], int], str]
) -> None:
    url, kill, pool = faulted
    counter = f"fault:{uuid.uuid4().hex}"
    killed: list[int] = []
    with deployment_worker(redis_url, f"db+{url}", redis_url, pool=pool) as (app, tasks, proc):
        results = [tasks.slow.delay(i, counter, 0.25) for i in range(RUNS)]
        killer = threading.Thread(target=_keep_killing, args=(kill, killed))
        killer.start()
        values = [result.get(timeout=120) for result in results]
        killer.join()
        runs = [get_task_run(result.id, app=app) for result in results]
        log = _output(proc)
    assert sum(killed) > 0, "the fault never hit the worker's connections"
    assert values == [i + 1 for i in range(RUNS)]
    for result, run in zip(results, runs, strict=True):
        assert run is not None, f"run {result.id} has no record"
        assert run.history_names()[-1] == "Completed", (result.id, run.history_names(), log)
    assert int(tasks.side.get(counter)) == RUNS  # every body once


def _keep_killing(kill: Callable[[], int], killed: list[int]) -> Any:
    deadline = time.monotonic() + FAULT_SECONDS
    while time.monotonic() < deadline:
        killed.append(kill())
        time.sleep(EVERY)
