"""Backend outages are waited out, not turned into failures (issue 11, break 5).

The result backend (a Redis of its own, append-only, so a restart is an outage and not a wipe)
goes down just as a countdown retry is delivered to a real prefork worker; the broker is a
second Redis that stays up. A plain Celery task with the same retry shape rides such an outage
out (Celery retries its backend writes), so an engine task must too: its claim and its run's
record are read with the same retry policy. An outage longer than that policy hands the
delivery back to the broker, as the same attempt, instead of failing the run.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.result import AsyncResult

from tests.reliability.harness import (
    RedisServer,
    WorkerProcess,
    load_run,
    redis_server,
    wait_for,
    workers,
)
from tests.reliability.worker_app import broker_side, make_app

pytestmark = pytest.mark.timeout(180)

#: Seconds the backend is down in the short outage (inside Celery's default 20 s policy).
SHORT_OUTAGE = 6.0
#: The backend ``max_retries`` (1 s apart) of the long-outage worker, and its outage: longer.
SHORT_PATIENCE_RETRIES = 2
LONG_OUTAGE = 8.0


@contextlib.contextmanager
def broker_and_backend(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, Celery, Any]]:
    """Two private Redis servers (broker, backend) and the reliability app on them."""
    (tmp_path / "broker").mkdir()
    (tmp_path / "backend").mkdir()
    with (
        redis_server(tmp_path / "broker") as broker,
        redis_server(tmp_path / "backend") as backend,
    ):
        app, tasks = make_app(
            f"{broker.url}/0", f"{backend.url}/0", queue=f"outage-{uuid.uuid4().hex[:8]}"
        )
        try:
            yield broker, backend, app, tasks
        finally:
            app.close()


def _state(app: Celery, task_id: str) -> str | None:
    """The task's state in the backend, or ``None`` while the backend cannot be read."""
    try:
        with app.connection_for_write():  # the app's pooled backend client reconnects by itself
            return str(AsyncResult(task_id, app=app).state)
    except Exception:
        return None


def _outage_as_the_retry_is_delivered(
    app: Celery, backend: RedisServer, result: Any, scheduled_state: str, down_for: float
) -> str:
    """Stop the backend as soon as the retry is scheduled (its countdown is 2 s), keep it down
    ``down_for`` s, start it again; the task's final Celery state."""
    wait_for(lambda: _state(app, result.id) == scheduled_state, 30, scheduled_state)
    backend.stop()
    time.sleep(down_for)
    backend.start()
    final = ("SUCCESS", "FAILURE")
    return str(
        wait_for(
            lambda: _state(app, result.id) in final and _state(app, result.id), 90, "a final state"
        )
    )


@pytest.mark.parametrize(
    ("kind", "pool"),
    [("engine", "prefork"), ("plain", "prefork"), ("engine", "threads"), ("engine", "gevent")],
)
def test_a_short_backend_outage_as_a_retry_is_delivered_is_waited_out(
    tmp_path: Path, kind: str, pool: str
) -> None:
    # Given a prefork worker, and a task whose first execution fails with a countdown retry
    with (
        broker_and_backend(tmp_path) as (_broker, backend, app, tasks),
        workers(WorkerProcess(app, tmp_path, pool=pool, concurrency=2)) as (worker,),
    ):
        key = f"short-{uuid.uuid4().hex[:8]}"
        task = tasks.retry_once if kind == "engine" else tasks.plain_retry_once
        result = task.delay(key)

        # When the backend is down for 6 s just as the retry is delivered
        scheduled = "AWAITING_RETRY" if kind == "engine" else "RETRY"
        state = _outage_as_the_retry_is_delivered(app, backend, result, scheduled, SHORT_OUTAGE)

        # Then the task ends as a plain Celery task does: SUCCESS, from its second execution
        assert state == "SUCCESS", worker.tail()
        assert result.get(timeout=10) == 2
        assert int(broker_side(app).get(f"exec:{key}")) == 2
        if kind == "engine":
            run = load_run(app, result.id)
            assert run is not None and run.state is not None, worker.tail()
            assert run.state.is_completed(), run.history_names()
            assert run.run_count == 2, run.history_names()


def test_an_outage_longer_than_the_retry_policy_hands_the_delivery_back(tmp_path: Path) -> None:
    # Given a worker whose backend retry policy is shorter than the coming outage
    with broker_and_backend(tmp_path) as (_broker, backend, app, tasks):
        env = {"RELIABILITY_BACKEND_MAX_RETRIES": str(SHORT_PATIENCE_RETRIES)}
        worker = WorkerProcess(app, tmp_path, pool="prefork", concurrency=2, env=env)
        with workers(worker):
            key = f"long-{uuid.uuid4().hex[:8]}"
            result = tasks.retry_once.delay(key)

            # When the backend is down for longer than that as the retry is delivered
            state = _outage_as_the_retry_is_delivered(
                app, backend, result, "AWAITING_RETRY", LONG_OUTAGE
            )

            # Then the delivery went back to the broker and ran once the backend was back,
            # as the same attempt: no attempt counted for the outage
            assert state == "SUCCESS", worker.tail()
            assert "handing the delivery back to the broker" in worker.log_text()
            assert result.get(timeout=10) == 2
            assert int(broker_side(app).get(f"exec:{key}")) == 2
            run = load_run(app, result.id)
            assert run is not None and run.state is not None, worker.tail()
            assert run.state.is_completed(), run.history_names()
            assert run.run_count == 2, run.history_names()
