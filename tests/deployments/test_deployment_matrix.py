"""The same checks on every kind of deployment, each through real ``celery worker`` processes:
Redis, SQLite (two worker processes on one file), PostgreSQL, MariaDB, and RabbitMQ with
``rpc://`` results plus the ``taskengine_store`` setting.

For each: ``.delay().get()``, a worker-side cache hit across processes, a producer-side hit,
``get_task_run`` from the producer, ``runs ls``, SERIALIZABLE across two worker processes
running the body once, a retry whose second attempt runs in another process with
``run_count`` 2, and ``--max-tasks-per-child=1`` with ``retries=1`` giving exactly 2 attempts.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from celery_taskengine import get_task_run
from celery_taskengine._celery.producer import CachedResult
from celery_taskengine._store.selection import store_for_app
from tests.bridge_workers import broker_url
from tests.deployments.workers import deployment_worker
from tests.test_store_contract import MARIADB_URL, POSTGRES_URL, _sql_store

pytestmark = [pytest.mark.timeout(240)]

DEPLOYMENTS = ["redis", "sqlite", "postgresql", "mariadb", "rpc+redis-store"]


class Deployment(NamedTuple):
    broker: str
    backend: str
    store: str | None


def _deployment(kind: str, redis_url: str, tmp_path: Path) -> Deployment:
    if kind == "redis":
        return Deployment(redis_url, redis_url, None)
    if kind == "rpc+redis-store":
        return Deployment(broker_url("amqp", redis_url), "rpc://", redis_url)
    url = {
        "sqlite": f"sqlite:///{tmp_path / 'results.db'}",
        "postgresql": POSTGRES_URL,
        "mariadb": MARIADB_URL,
    }[kind]
    _sql_store(url, "probe").close()  # reachable (fails in CI if not), tables made
    return Deployment(redis_url, f"db+{url}", None)


@pytest.fixture(params=DEPLOYMENTS)
def worker(request: pytest.FixtureRequest, redis_url: str, tmp_path: Path) -> Iterator[Any]:
    deployment = _deployment(request.param, redis_url, tmp_path)
    with deployment_worker(
        deployment.broker, deployment.backend, redis_url, store=deployment.store
    ) as (app, tasks, _):
        yield app, tasks, deployment


def _key() -> str:
    return f"c:{uuid.uuid4().hex}"


def test_a_task_runs_and_its_run_is_seen_and_listed_from_the_producer(worker: Any) -> None:
    app, tasks, _ = worker
    result = tasks.cached.delay(1, _key())

    assert result.get(timeout=60) == 10
    run = get_task_run(result.id, app=app)
    assert run is not None and run.history_names() == ["Pending", "Running", "Completed"]
    assert result.id in {r.id for r in store_for_app(app).list_runs(20, task="cached")}


def test_a_cached_result_is_shared_by_worker_processes_and_the_producer(worker: Any) -> None:
    _, tasks, _ = worker
    counter = _key()
    first = tasks.cached.delay(2, counter).get(timeout=60)
    in_workers = [tasks.slow.delay(5, counter, 0.0) for _ in range(1)]  # another task between
    assert [r.get(timeout=60) for r in in_workers] == [6]

    at_send = tasks.cached.delay(2, counter)

    assert first == 20
    assert isinstance(at_send, CachedResult)  # answered from the store, nothing published
    assert at_send.get(timeout=5) == 20
    assert int(tasks.side.get(counter)) == 2  # cached once, slow once


def test_serializable_runs_the_body_once_across_worker_processes(worker: Any) -> None:
    _, tasks, _ = worker
    counter = _key()
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda: results.append(tasks.serial.delay(7, counter)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert [r.get(timeout=90) for r in results] == [21, 21]
    assert int(tasks.side.get(counter)) == 1


@pytest.fixture(params=DEPLOYMENTS)
def one_task_per_child(
    request: pytest.FixtureRequest, redis_url: str, tmp_path: Path
) -> Iterator[Any]:
    deployment = _deployment(request.param, redis_url, tmp_path)
    with deployment_worker(
        deployment.broker,
        deployment.backend,
        redis_url,
        store=deployment.store,
        extra=("--max-tasks-per-child=1",),
    ) as (app, tasks, _):
        yield app, tasks


def test_a_retry_continues_its_run_in_another_process(one_task_per_child: Any) -> None:
    app, tasks = one_task_per_child
    counter = _key()

    result = tasks.flaky.delay(counter)

    second_pid = result.get(timeout=90)
    run = get_task_run(result.id, app=app)
    assert run is not None and run.run_count == 2
    assert run.history_names()[-1] == "Completed"
    assert isinstance(second_pid, int)


def test_retries_are_counted_from_the_message_not_the_record(one_task_per_child: Any) -> None:
    _, tasks = one_task_per_child
    attempts = _key()

    result = tasks.always_fails.delay(attempts)

    with pytest.raises(ConnectionError):
        result.get(timeout=90)
    pids = tasks.side.lrange(attempts, 0, -1)
    assert len(pids) == 2  # one retry, never more
    assert len(set(pids)) == 2  # each attempt in a new child
