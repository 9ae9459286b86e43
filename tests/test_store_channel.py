"""The store's write channel against a real Redis that refuses, caps, forks and is old.

Each test is one of issue 11's breaks: writes Redis refused (OOM with ``noeviction``, an ACL
user without access to the engine's keys, a backend demoted to a replica) are reported, not
swallowed (4); the connections the engine keeps never come from Celery's capped pool (7);
``multiprocessing`` children's records reach Redis (8); redis-py 5.x pools, whose
``get_connection`` needs a command name, work (9).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_taskengine import flush_run_records, task
from celery_taskengine._engine.observers import RunObservers
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._store.redis_store import RedisStore
from celery_taskengine._store.worker_records import Delivery, delivery_observers
from celery_taskengine.cache_policies import INPUTS
from celery_taskengine.errors import StoreUnavailableError
from celery_taskengine.states import Completed, Pending, Running
from celery_taskengine.task_engine import run_task_sync
from tests.multiprocessing_children import run_children
from tests.reliability.harness import RedisServer, redis_server

#: How long a test waits for a record written behind (about 10 ms is expected).
PATIENCE_SECONDS = 5.0


def app_on(url: str, **conf: Any) -> Celery:
    app = Celery(f"channel-{uuid.uuid4().hex[:8]}", set_as_current=False)
    app.conf.update(broker_url=url, result_backend=url, **conf)
    return app


def run_locally(t: Any, **parameters: Any) -> str:
    run_id = uuid.uuid4().hex
    run_task_sync(t, run_id, parameters=parameters)
    return run_id


def run_history(client: redis.Redis, run_id: str) -> list[str] | None:
    raw = client.get(f"cte:default:run:{run_id}")
    return None if raw is None else [s["name"] for s in json.loads(raw)["state_history"]]


# -- break 4: refused writes are reported --------------------------------------------------------


def refuse_out_of_memory(server: RedisServer) -> str:
    admin = redis.Redis(port=server.port)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    return f"{server.url}/0"


def refuse_without_access(server: RedisServer) -> str:
    admin = redis.Redis(port=server.port)
    admin.acl_setuser(
        "celery-only",
        enabled=True,
        passwords=["+secret"],
        keys=["celery-task-meta-*"],
        commands=["+@all"],
    )
    return f"redis://celery-only:secret@127.0.0.1:{server.port}/0"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as private:
        yield private


@pytest.mark.parametrize(
    ("refusal", "error"),
    [(refuse_out_of_memory, "OutOfMemoryError"), (refuse_without_access, "NoPermissionError")],
    ids=["oom", "noperm"],
)
def test_a_local_record_redis_refuses_is_reported_by_flush_and_logged(
    server: RedisServer, refusal: Any, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_on(refusal(server))
    t = task(app=app, name="channel.refused")(lambda x: x)
    try:
        with caplog.at_level(logging.ERROR, logger="celery_taskengine"):
            run_id = run_locally(t, x=1)
            flushed = flush_run_records(app)
    finally:
        app.close()

    assert not flushed
    assert run_id in flushed.lost_runs
    logged = [r.getMessage() for r in caplog.records if run_id in r.getMessage()]
    assert any(error in message for message in logged), logged


def test_a_local_record_a_demoted_backend_refuses_is_reported_by_flush_and_logged(
    server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_on(f"{server.url}/0")
    t = task(app=app, name="channel.demoted")(lambda x: x)
    try:
        assert flush_run_records(app) is not None
        run_locally(t, x=0)  # the recorder's connection is up before the failover
        assert flush_run_records(app)
        (tmp_path / "primary").mkdir()
        with redis_server(tmp_path / "primary") as primary:
            redis.Redis(port=server.port).replicaof("127.0.0.1", primary.port)
            with caplog.at_level(logging.ERROR, logger="celery_taskengine"):
                run_id = run_locally(t, x=1)
                flushed = flush_run_records(app)
            redis.Redis(port=server.port).replicaof("NO", "ONE")
    finally:
        app.close()

    assert not flushed
    assert run_id in flushed.lost_runs
    logged = [r.getMessage() for r in caplog.records if run_id in r.getMessage()]
    assert any("ReadOnlyError" in message for message in logged), logged


def test_a_local_record_made_while_redis_restarts_is_written_once_it_is_back(
    server: RedisServer,
) -> None:
    app = app_on(f"{server.url}/0")
    t = task(app=app, name="channel.outage")(lambda x: x)
    try:
        run_locally(t, x=0)
        assert flush_run_records(app)  # the recorder's connection is up
        server.stop()
        run_id = run_locally(t, x=1)  # written behind, while Redis is away
        time.sleep(1.0)  # the flusher tries, and keeps the record
        server.start()
        flushed = flush_run_records(app, timeout=10)
        history = run_history(redis.Redis(port=server.port), run_id)
    finally:
        app.close()

    assert flushed, flushed
    assert history == ["Pending", "Running", "Completed"]


def test_a_worker_runs_final_record_redis_refuses_past_the_policy_fails_its_delivery_loudly(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A refusal is waited out as long as the backend's retry policy (here about 1 s) says.
    policy = {"retry_policy": {"max_retries": 2, "interval_max": 0.5}}
    app = app_on(f"{server.url}/0", result_backend_transport_options=policy)
    store = RedisStore.for_app(app)
    delivery = Delivery(
        "run-oom", "run-oom", "w@x", retries=0, redelivered=False, send_events=False
    )
    recorder = RunObservers(delivery_observers(app, store, delivery))
    run = TaskRun(id="run-oom", name="t", task_name="t", parameters={})
    try:
        for state in (Pending(), Running()):
            run.state = state
            run.state_history.append(state)
            recorder(run, state)
        refuse_out_of_memory(server)
        completed = Completed(data=1)
        run.state = completed
        run.state_history.append(completed)
        recorder(run, completed)
        with (
            caplog.at_level(logging.ERROR),
            pytest.raises(StoreUnavailableError, match="OutOfMemory"),
        ):
            recorder.end(run)  # before Celery would store SUCCESS
    finally:
        app.close()
    assert any("run-oom" in record.getMessage() for record in caplog.records)


# -- break 7: kept connections never exhaust Celery's pool ---------------------------------------


def test_cache_hits_from_four_threads_leave_a_capped_backend_pool_to_celery(
    redis_app_factory: Any,
) -> None:
    app = redis_app_factory(redis_max_connections=4, taskengine_store_max_connections=2)
    square = task(app=app, name="channel.square", cache_policy=INPUTS)(lambda x: x * x)
    assert square(3) == 9
    errors: list[BaseException] = []

    def hits() -> None:
        try:
            for _ in range(50):
                assert square(3) == 9
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hits) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors, errors[:1]
    assert flush_run_records(app)
    # Celery's pool still has room for Celery: four connections at once.
    from celery_taskengine._store.wire import checkout  # (redis-py 5 and 6+ differ)

    pool = app.backend.client.connection_pool
    held = [checkout(pool) for _ in range(4)]
    for connection in held:
        pool.release(connection)
    assert app.backend.get_task_meta(uuid.uuid4().hex)["status"] == "PENDING"


# -- break 8: multiprocessing children --------------------------------------------------------


def test_local_runs_of_multiprocessing_children_reach_redis(
    redis_app: Any, redis_client: redis.Redis
) -> None:
    run_ids = [f"child-{n}-{uuid.uuid4().hex}" for n in range(10)]
    urls = {
        "broker_url": redis_app.conf.broker_url,
        "result_backend": redis_app.conf.result_backend,
    }
    run_children(urls, run_ids)

    deadline = time.monotonic() + PATIENCE_SECONDS
    while time.monotonic() < deadline:
        histories = [run_history(redis_client, run_id) for run_id in run_ids]
        if all(histories):
            break
        time.sleep(0.05)
    assert histories == [["Pending", "Running", "Completed"]] * 10


# -- break 9: redis-py 5.x pools ----------------------------------------------------------------


class Redis5Pool:
    """``get_connection`` as redis-py 5.0 to 5.2 declare it: the command name is required."""

    def get_connection(self, command_name: str, *keys: Any, **options: Any) -> str:
        return command_name


class Redis6Pool:
    """``get_connection`` as redis-py 6 and later declare it: arguments deprecated."""

    def get_connection(self, *args: Any, **options: Any) -> tuple[Any, ...]:
        return args


def test_a_connection_is_checked_out_as_each_redis_py_version_asks() -> None:
    from celery_taskengine._store.wire import checkout

    assert checkout(Redis5Pool()) == "PING"
    assert checkout(Redis6Pool()) == ()
