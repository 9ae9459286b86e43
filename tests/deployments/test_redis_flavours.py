"""Engine tasks on every Redis deployment shape, through a real prefork worker: TLS, a
password, an ACL user granted the engine's keys, and Sentinel (with a failover while runs are
in flight). The unix-socket case is in tests/test_store_selection.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult

from celery_taskengine import get_task_run
from celery_taskengine._store.selection import store_for_app
from celery_taskengine.errors import StorePermissionError
from tests.deployments.servers import (
    make_certificates,
    redis_process,
    sentinel_setup,
)
from tests.deployments.workers import deployment_worker

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

#: Every key and command family the engine uses, for an ACL user (see the README).
ENGINE_ACL = [
    "on", ">engine-pw", "~celery-task-meta-*", "~celery-taskset-meta-*", "~chord-unlock-*",
    "~cte:*", "&*", "+@all",
]  # fmt: skip


def _checks(app: Any, tasks: Any) -> None:
    """What every deployment must do: run, hit the cache across processes, show the run."""
    counter = f"c:{uuid.uuid4().hex}"
    results = []
    for _ in range(2):  # one after the other: the second is a hit in whichever process
        results.append(tasks.cached.delay(4, counter))
        assert results[-1].get(timeout=60) == 40
    again = tasks.cached.delay(4, counter)
    assert again.get(timeout=60) == 40
    assert int(tasks.side.get(counter)) == 1  # one execution, then hits
    run = get_task_run(results[0].id, app=app)
    assert run is not None and run.history_names()[-1] in ("Completed", "Cached")
    listed = store_for_app(app).list_runs(10, task="cached")
    assert {r.id for r in listed} >= {results[0].id, again.id}


def test_a_tls_backend_serves_engine_tasks(redis_url: str, tmp_path: Path) -> None:
    tls = make_certificates(tmp_path / "certs")
    with redis_process(tmp_path / "tls", tls=tls) as server:
        backend = (
            f"rediss://127.0.0.1:{server.port}/0?ssl_cert_reqs=required&ssl_ca_certs={tls['ca']}"
        )
        with deployment_worker(redis_url, backend, redis_url) as (app, tasks, _):
            _checks(app, tasks)


def test_a_password_protected_backend_serves_engine_tasks(redis_url: str, tmp_path: Path) -> None:
    with redis_process(tmp_path / "pw", password="s3cret") as server:
        backend = f"redis://:s3cret@127.0.0.1:{server.port}/0"
        with deployment_worker(redis_url, backend, redis_url) as (app, tasks, _):
            _checks(app, tasks)


def test_an_acl_user_granted_the_engine_keys_serves_engine_tasks(
    redis_url: str, tmp_path: Path
) -> None:
    with redis_process(tmp_path / "acl") as server:
        server.client().execute_command("ACL", "SETUSER", "engine", *ENGINE_ACL)
        backend = f"redis://engine:engine-pw@127.0.0.1:{server.port}/0"
        with deployment_worker(redis_url, backend, redis_url) as (app, tasks, _):
            _checks(app, tasks)


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[Any]:
    with sentinel_setup(tmp_path / "sentinel") as setup:
        yield setup


@pytest.mark.parametrize("pool", ["prefork", "threads", "gevent"])
def test_a_sentinel_backend_serves_engine_tasks_and_loses_no_run_in_a_failover(
    redis_url: str, sentinel: Any, pool: str
) -> None:
    options = {"master_name": "mymaster"}
    backend = f"{sentinel.url}/0"
    with deployment_worker(redis_url, backend, redis_url, pool=pool, backend_options=options) as (
        app,
        tasks,
        _,
    ):
        _checks(app, tasks)
        waits = sentinel.master.client().info("commandstats").get("cmdstat_wait", {})
        assert waits.get("calls", 0) >= 4  # outcomes waited for the replica (see replicas)
        counter = f"slow:{uuid.uuid4().hex}"
        in_flight = [tasks.slow.delay(i, counter, 0.5) for i in range(8)]
        time.sleep(0.5)
        old_master = sentinel.current_master_port()
        sentinel.master.proc.kill()  # the master dies with runs in flight
        _wait(lambda: sentinel.current_master_port() != old_master, 30, "a failover")
        _wait(sentinel.master_is_served, 30, "the new master served by the sentinel")

        values = [r.get(timeout=90) for r in in_flight]

        assert values == [i + 1 for i in range(8)]
        for result in in_flight:
            run = get_task_run(result.id, app=app)
            assert run is not None, f"run {result.id} lost in the failover"
            history = run.history_names()
            assert history[-1] == "Completed", f"run {result.id}: {history}"
            assert AsyncResult(result.id, app=app).state == "SUCCESS", result.id


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.2)


#: An ACL user for Celery's own keys only: no access to the engine's ``cte:*``.
CELERY_ONLY_ACL = [
    "on", ">celery-pw", "~celery-task-meta-*", "~celery-taskset-meta-*", "~chord-unlock-*",
    "~_kombu*", "&*", "+@all",
]  # fmt: skip


def test_an_acl_user_without_the_engine_keys_gets_one_clear_error(
    redis_url: str, tmp_path: Path
) -> None:
    from tests.deployments.workers import worker_output

    with redis_process(tmp_path / "acl-celery") as server:
        server.client().execute_command("ACL", "SETUSER", "celery", *CELERY_ONLY_ACL)
        backend = f"redis://celery:celery-pw@127.0.0.1:{server.port}/0"
        with deployment_worker(redis_url, backend, redis_url, wait=False) as (_, tasks, proc):
            output = worker_output(proc, timeout=60)  # the worker refuses to start
            with pytest.raises(StorePermissionError, match=r"cte:default:\*"):
                tasks.cached.delay(1, "c")  # a producer-side cache read, refused

    assert proc.returncode != 0
    assert "StorePermissionError" in output or "may not run what the engine needs" in output
    assert "cte:default:*" in output


def test_local_runs_through_sentinel_read_and_record_on_the_master(sentinel: Any) -> None:
    """The engine's own connections (early reads, run records) ask the sentinels for the
    master as Celery's do; they once went to a connection's default host, localhost:6379."""
    from celery import Celery

    from celery_taskengine import flush_run_records, task
    from celery_taskengine.cache_policies import INPUTS
    from celery_taskengine.task_engine import run_task_sync

    app = Celery("sentinel-local", backend=f"{sentinel.url}/0", set_as_current=False)
    app.conf.result_backend_transport_options = {"master_name": "mymaster"}
    calls: list[int] = []

    @task(app=app, name="sentinel.square", cache_policy=INPUTS)
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    run_ids = [uuid.uuid4().hex for _ in range(3)]
    for run_id in run_ids:
        assert run_task_sync(square, run_id, parameters={"x": 7}) == 49
    assert calls == [7]  # computed once, then read from the master
    assert flush_run_records(app)
    master = sentinel.master.client()
    assert master.keys("cte:default:cache:*")
    for run_id in run_ids:
        assert master.exists(f"cte:default:run:{run_id}"), run_id
    app.close()
