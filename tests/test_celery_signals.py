"""Celery's task signals and a user's ``Task`` method overrides fire for engine tasks as for
plain tasks (SPEC §10), in a real prefork ``celery worker`` on Redis.

The worker (``tests.bridge.signals_app``) records every signal and handler call into Redis
from whichever process fires it; each engine task is compared with a plain Celery twin.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import TaskRevokedError
from celery.result import AsyncResult

from celery_taskengine import get_task_run
from tests.test_worker_bridge import worker_process

MODULE = "tests.bridge.signals_app"


@pytest.fixture(scope="module")
def app(redis_server: str) -> Iterator[Celery]:
    queue = f"signals-{uuid.uuid4().hex[:8]}"
    app = Celery("signals-caller", broker=redis_server + "/0", backend=redis_server + "/1")
    app.conf.update(task_default_queue=queue, broker_connection_retry_on_startup=True)
    with worker_process(app, "prefork", concurrency=2, module=MODULE):
        yield app
    app.close()


def records(app: Celery, task_id: str) -> list[dict[str, Any]]:
    raw = app.backend.client.lrange(f"signals:{task_id}", 0, -1)
    return [json.loads(entry) for entry in raw]


def names(app: Celery, task_id: str) -> list[str]:
    return [entry["signal"] for entry in records(app, task_id)]


def settled(app: Celery, task_id: str, last: str = "task_postrun", count: int = 1) -> None:
    """Wait until the worker recorded ``count`` ``last`` entries (postrun comes after get())."""
    deadline = time.monotonic() + 20
    while names(app, task_id).count(last) < count:
        assert time.monotonic() < deadline, f"{task_id}: only {names(app, task_id)}"
        time.sleep(0.05)


def send(app: Celery, name: str, *args: Any) -> AsyncResult:
    return app.send_task(name, args=list(args), queue=app.conf.task_default_queue)


def without(entries: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in entry.items() if k not in keys} for entry in entries]


def test_a_success_fires_the_same_signals_and_handlers_as_a_plain_task(app: Celery) -> None:
    engine, plain = send(app, "sig.engine_double", 21), send(app, "sig.plain_double", 21)
    assert engine.get(timeout=20) == plain.get(timeout=20) == 42
    settled(app, engine.id)
    settled(app, plain.id)
    assert records(app, engine.id) == records(app, plain.id)
    assert names(app, engine.id) == [
        "task_prerun",
        "before_start",
        "on_success",
        "task_success",
        "after_return",
        "task_postrun",
    ]
    # before_start overridden without super(): the delivery still ran through the engine
    run = get_task_run(engine.id, app=app)
    assert run is not None and run.history_names() == ["Pending", "Running", "Completed"]


def test_a_failure_fires_the_same_signals_and_handlers_as_a_plain_task(app: Celery) -> None:
    engine, plain = send(app, "sig.engine_fail", "boom"), send(app, "sig.plain_fail", "boom")
    for result in (engine, plain):
        with pytest.raises(ValueError, match="boom"):
            result.get(timeout=20)
    settled(app, engine.id)
    settled(app, plain.id)
    assert records(app, engine.id) == records(app, plain.id)
    assert "task_failure" in names(app, engine.id)
    assert "task_success" not in names(app, engine.id)


def test_a_retry_that_leaves_the_worker_fires_task_retry_once_as_celery_does(
    app: Celery,
) -> None:
    counter = f"test:sig:{uuid.uuid4().hex}"
    engine = send(app, "sig.engine_retry", counter + "-e")
    plain = send(app, "sig.plain_retry", counter + "-p")
    # the user's on_retry (no super()) does not hide the engine state during the wait
    # (Celery's RETRY shows only for the moment before it is replaced)
    seen: list[str] = []
    deadline = time.monotonic() + 20
    while not engine.ready() and time.monotonic() < deadline:
        if not seen or seen[-1] != engine.state:
            seen.append(engine.state)
        time.sleep(0.02)
    assert "AWAITING_RETRY" in seen
    assert "RETRY" not in seen[seen.index("AWAITING_RETRY") :], seen
    assert engine.get(timeout=20) == plain.get(timeout=20) == "second attempt"
    settled(app, engine.id, count=2)
    settled(app, plain.id, count=2)
    ours, theirs = records(app, engine.id), records(app, plain.id)
    assert (
        [e["signal"] for e in ours]
        == [e["signal"] for e in theirs]
        == [
            *("task_prerun", "before_start", "on_retry", "task_retry", "task_postrun"),
            *("task_prerun", "before_start", "on_success", "task_success", "after_return"),
            "task_postrun",
        ]
    )
    # the same arguments (each task has its own counter), except where the engine's Retry
    # differs by nature: its countdown is what was left of the delay, not a round figure
    assert without(ours, "when", "retval", "args") == without(theirs, "when", "retval", "args")
    assert {str(e.get("args")) for e in ours} == {str([counter + "-e"]), "None"}
    retry = next(entry for entry in ours if entry["signal"] == "task_retry")
    assert retry["reason"] == "Retry" and retry["retries"] == 0
    assert retry["exc"] == "ConnectionError('first attempt fails')"
    assert 1.5 < retry["when"] <= 2


def test_an_error_in_a_handler_fires_task_internal_error_as_for_a_plain_task(
    app: Celery,
) -> None:
    engine, plain = send(app, "sig.engine_internal"), send(app, "sig.plain_internal")
    for result in (engine, plain):
        with pytest.raises(Exception):  # noqa: B017  (Celery reports its internal error)
            result.get(timeout=20)
    # the worker's main process then reports the failed handler with task_failure
    settled(app, engine.id, last="task_failure")
    settled(app, plain.id, last="task_failure")
    assert records(app, engine.id) == records(app, plain.id)
    assert {"signal": "task_internal_error", "exception": "RuntimeError('on_failure broke')"} in (
        records(app, engine.id)
    )


def test_a_run_the_engine_finds_revoked_fires_task_revoked_once(app: Celery) -> None:
    started, gate = f"test:sig:{uuid.uuid4().hex}", f"test:sig:{uuid.uuid4().hex}"
    result = send(app, "sig.engine_revoked", started, gate)
    wait(lambda: app.backend.client.exists(started))
    app.control.revoke(result.id)  # not terminated: the engine sees it before the next attempt
    time.sleep(0.5)  # the revoke reaches the worker (and its marker the store)
    app.backend.client.set(gate, "1")
    with pytest.raises(TaskRevokedError):
        result.get(timeout=20)
    settled(app, result.id)
    revoked = [entry for entry in records(app, result.id) if entry["signal"] == "task_revoked"]
    assert revoked == [
        {"signal": "task_revoked", "terminated": False, "expired": False, "signum": None}
    ]
    run = get_task_run(result.id, app=app)
    assert run is not None and run.history_names()[-1] == "Cancelled"


def wait(condition: Callable[[], Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
