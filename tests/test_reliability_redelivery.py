"""Redelivery for real: Redis gives an unacknowledged message to a worker again (SPEC §3 [ours]).

Redis has no real acknowledgements: kombu keeps each delivered, unacknowledged message in an
``unacked`` hash and puts it back in its queue once it is older than the visibility timeout
(Celery's default: one hour; 2 s here, swept every 0.5 s). That happens to an attempt that
already finished when the worker died before acknowledging it, to an attempt still running
after the visibility timeout, and to a retry's countdown message, which a worker holds
unacknowledged on its timer for the whole countdown. Each must run the function once: the
deliveries claim their message (see celery_taskengine._store.claims).
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult

from tests.reliability.harness import (
    STORE_KINDS,
    WorkerProcess,
    counter,
    deliveries,
    history_problems,
    load_run,
    reliability_app,
    result_backend,
    wait_for,
    workers,
)
from tests.reliability.worker_app import side

pytestmark = pytest.mark.timeout(120)

VISIBILITY_TIMEOUT = 2.0
#: Longer than the visibility timeout, so the retry message is given out again meanwhile.
RETRY_COUNTDOWN = 4.0
#: Seconds a duplicate delivery gets to act before the original attempt is released.
DUPLICATE_GRACE = 5.0
#: Bound on waits that include a redelivery (visibility timeout, sweep, worker start-up).
REDELIVERY_TIMEOUT = 45.0


@pytest.fixture(params=STORE_KINDS)
def rel(
    request: pytest.FixtureRequest, redis_url: str, tmp_path: Path
) -> Iterator[tuple[Any, Any]]:
    """The app, with results (and the engine's store) on Redis or on a database."""
    backend = result_backend(request.param, redis_url, tmp_path)
    with reliability_app(
        redis_url, backend=backend, visibility_timeout=VISIBILITY_TIMEOUT
    ) as app_and_tasks:
        yield app_and_tasks


@pytest.mark.parametrize("redelivered_by", ["another-worker", "a-restarted-worker"])
def test_a_finished_attempt_delivered_again_does_not_run_the_function_again(
    redelivered_by: str, rel: tuple[Any, Any], tmp_path: Path
) -> None:
    app, tasks = rel
    key, gate = uuid.uuid4().hex, f"gate:{uuid.uuid4().hex}"
    first = WorkerProcess(app, tmp_path, concurrency=1)
    with workers(first):
        result = tasks.gated.delay(key, gate)
        wait_for(lambda: counter(app, f"exec:{key}") == 1, 30, "the body to start")
        # Given: the worker's main process, which acknowledges messages, is frozen, while its
        # pool process finishes the run and stores the result.
        os.kill(first.pid, signal.SIGSTOP)
        side(app).set(gate, 1)
        wait_for(lambda: AsyncResult(result.id, app=app).state == "SUCCESS", 30, "SUCCESS")
        assert load_run(app, result.id).history_names() == ["Pending", "Running", "Completed"]
        # When: the unacknowledged message is given out again.
        if redelivered_by == "another-worker":
            other = WorkerProcess(app, tmp_path, concurrency=1)
            with workers(other):
                wait_for_redelivered_delivery_to_end(app, result.id)
        else:
            first.kill()
            first.start()
            wait_for_redelivered_delivery_to_end(app, result.id)

    # Then: the delivery returned the recorded outcome; the body never ran again.
    assert counter(app, f"exec:{key}") == 1
    assert result.get(timeout=5) == f"done {key}"
    run = load_run(app, result.id)
    assert run.history_names() == ["Pending", "Running", "Completed"]
    assert run.run_count == 1


def wait_for_redelivered_delivery_to_end(app: Any, task_id: str) -> None:
    def ended() -> bool:
        log = deliveries(app)
        redelivered = [row for row in log.started(task_id) if row[2]]
        return bool(redelivered) and len(log.ended(task_id)) >= 2

    wait_for(ended, REDELIVERY_TIMEOUT, f"a redelivery of {task_id} to be run and end")


def test_an_attempt_running_longer_than_the_visibility_timeout_is_not_run_twice(
    rel: tuple[Any, Any], tmp_path: Path
) -> None:
    app, tasks = rel
    key, gate = uuid.uuid4().hex, f"gate:{uuid.uuid4().hex}"
    with workers(WorkerProcess(app, tmp_path, concurrency=2)):
        # Given: an attempt that is still running when its message is given out again.
        result = tasks.gated.delay(key, gate)
        wait_for(
            lambda: any(row[2] for row in deliveries(app).started(result.id)),
            REDELIVERY_TIMEOUT,
            "Redis to give the running attempt's message out again",
        )
        # The duplicate gets time to decide (it ends, or runs the body) before the original
        # may finish: released at once, the original could end first and hide the duplicate.
        with contextlib.suppress(AssertionError):
            wait_for(
                lambda: (
                    counter(app, f"exec:{key}") > 1 or len(deliveries(app).ended(result.id)) > 0
                ),
                DUPLICATE_GRACE,
                "the duplicate to run the body or end",
            )
        # When: the attempt finishes.
        side(app).set(gate, 1)
        assert result.get(timeout=REDELIVERY_TIMEOUT) == f"done {key}"
        wait_for(
            lambda: (
                len(deliveries(app).ended(result.id)) == len(deliveries(app).started(result.id))
            ),
            REDELIVERY_TIMEOUT,
            "every delivery to end",
        )

    # Then: the body ran once, and the history does not claim a crash that never happened.
    run = load_run(app, result.id)
    assert counter(app, f"exec:{key}") == 1, f"body ran twice; history {run.history_names()}"
    assert run.history_names() == ["Pending", "Running", "Completed"]


def test_a_retry_countdown_longer_than_the_visibility_timeout_runs_each_attempt_once(
    rel: tuple[Any, Any], tmp_path: Path
) -> None:
    app, tasks = rel
    key = uuid.uuid4().hex
    retries = tasks.flaky.engine_options.retries
    assert tasks.flaky.engine_options.retry_delays == (RETRY_COUNTDOWN,)
    with workers(WorkerProcess(app, tmp_path, concurrency=2)):
        # When: every attempt but the last fails, and each retry waits 4 s on the broker.
        result = tasks.flaky.delay(key, retries)
        value = result.get(timeout=REDELIVERY_TIMEOUT)
        # Redelivered copies of the countdown messages are run too; let them finish.
        wait_for(
            lambda: (
                len(deliveries(app).ended(result.id)) == len(deliveries(app).started(result.id))
            ),
            REDELIVERY_TIMEOUT,
            "every delivery to end",
        )
        log = deliveries(app)
        redelivered = [row for row in log.started(result.id) if row[2]]

    # The fault happened: Redis gave a countdown message out again.
    assert redelivered, "no message was redelivered: the visibility timeout never passed"
    # Then: the body ran exactly retries + 1 times, and the history says so once.
    run = load_run(app, result.id)
    assert not history_problems(run, result.id)
    names = run.history_names()
    assert counter(app, f"exec:{key}") == retries + 1, f"body ran too often; history {names}"
    assert value == retries + 1
    assert names == ["Pending", "Running"] + ["AwaitingRetry", "Retrying"] * retries + ["Completed"]
    assert run.run_count == retries + 1
