"""Claims as fencing tokens, for real: Redis, ``celery worker`` processes, signals.

A delivery claims its message before its run's outcome counts (see
celery_taskengine._store.claims). Two ways the broker hands a message out twice are played
here with a short visibility timeout:

- a message waiting in a worker's prefetch buffer (Celery's default early acknowledgement) is
  given to another worker, which completes it; the original copy must then not run again;
- the process running an attempt is paused (SIGSTOP) longer than its claim lives, so a
  redelivered copy takes the run over; when the paused attempt resumes, it must not write its
  outcome over the new holder's.
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
    claim_holder,
    counter,
    deliveries,
    history_problems,
    load_run,
    reliability_app,
    result_backend,
    wait_for,
    workers,
)
from tests.reliability.worker_app import CLAIM_TTL, side

pytestmark = pytest.mark.timeout(180)

VISIBILITY_TIMEOUT = 2.0
#: Bound on waits that include a redelivery (visibility timeout, sweep, worker start-up).
REDELIVERY_TIMEOUT = 45.0
#: How long the holder is paused: well past its claim's lifetime.
PAUSE = CLAIM_TTL * 3


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


def test_a_message_completed_elsewhere_while_it_waited_in_a_prefetch_buffer_does_not_run_again(
    rel: tuple[Any, Any], tmp_path: Path
) -> None:
    app, tasks = rel
    long_key, key, gate = uuid.uuid4().hex, uuid.uuid4().hex, f"gate:{uuid.uuid4().hex}"
    first = WorkerProcess(app, tmp_path, concurrency=1)
    other = WorkerProcess(app, tmp_path, concurrency=1)
    with workers(first):
        # Given: a worker busy with a long task (acknowledged when it started), holding the
        # next message in its prefetch buffer, unacknowledged, past the visibility timeout.
        ahead = tasks.early_acked.delay(long_key, gate)
        wait_for(lambda: counter(app, f"exec:{long_key}") == 1, 30, "the long task to start")
        result = tasks.early_acked.delay(key)
        # When: Redis gives the buffered message to another worker, which completes it.
        with workers(other):
            wait_for(
                lambda: AsyncResult(result.id, app=app).state == "SUCCESS",
                REDELIVERY_TIMEOUT,
                "the other worker to complete the redelivered copy",
            )
            first_value = AsyncResult(result.id, app=app).get(timeout=5)
            assert first_value["execution"] == 1
            # And: the first worker finally starts the copy it kept in its buffer.
            side(app).set(gate, 1)
            assert ahead.get(timeout=REDELIVERY_TIMEOUT)["execution"] == 1
            wait_for(
                lambda: len(deliveries(app).ended(result.id)) >= 2,
                REDELIVERY_TIMEOUT,
                "the buffered copy's delivery to end",
            )

    # Then: the body ran once, the stored SUCCESS is the first completion's, and the record
    # shows that one attempt.
    log = deliveries(app)
    assert counter(app, f"exec:{key}") == 1, f"body ran again; deliveries {log.started(result.id)}"
    assert AsyncResult(result.id, app=app).get(timeout=5) == first_value
    assert sorted(row[1] for row in log.ended(result.id)) == ["IGNORED", "SUCCESS"]
    run = load_run(app, result.id)
    assert not history_problems(run, result.id)
    assert run.history_names() == ["Pending", "Running", "Completed"]
    assert run.run_count == 1


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_paused_holder_whose_claim_lapsed_does_not_write_over_the_new_holder(
    pool: str, rel: tuple[Any, Any], tmp_path: Path
) -> None:
    app, tasks = rel
    key, gate = uuid.uuid4().hex, f"gate:{uuid.uuid4().hex}"
    # prefork: one worker, the holder's pool process is paused; threads: the holder's whole
    # worker is paused, and a second worker takes the copy.
    holder = WorkerProcess(app, tmp_path, pool=pool, concurrency=2 if pool == "prefork" else 1)
    other = WorkerProcess(app, tmp_path, pool=pool, concurrency=1)
    paused: list[int] = []
    with workers(holder), contextlib.ExitStack() as stack:
        try:
            # Given: an attempt still running when Redis gives its message out again; the copy
            # waits for the holder.
            result = tasks.fenced.delay(key, gate)
            wait_for(lambda: counter(app, f"exec:{key}") == 1, 30, "the body to start")
            if pool != "prefork":
                stack.enter_context(workers(other))
            wait_for(
                lambda: any(row[2] for row in deliveries(app).started(result.id)),
                REDELIVERY_TIMEOUT,
                "Redis to give the running attempt's message out again",
            )
            holder_pid = next(row[3] for row in deliveries(app).started(result.id) if not row[2])
            # When: the holder's process is paused longer than its claim lives, so the copy
            # takes the run over and completes it.
            os.kill(holder_pid, signal.SIGSTOP)
            paused.append(holder_pid)
            wait_for(lambda: counter(app, f"exec:{key}") == 2, PAUSE * 5, "the copy to take over")
            side(app).set(gate, 1)
            value = result.get(timeout=REDELIVERY_TIMEOUT)
            assert value["execution"] == 2
            wait_for(
                lambda: len(deliveries(app).ended(result.id)) >= 1,
                REDELIVERY_TIMEOUT,
                "the new holder's delivery to end",
            )
        finally:
            # And: the paused attempt resumes and finishes its body.
            for pid in paused:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        wait_for(
            lambda: any(row[2] == holder_pid for row in deliveries(app).ended(result.id)),
            REDELIVERY_TIMEOUT,
            "the paused holder's delivery to end",
        )
        wait_for(
            lambda: (
                len(deliveries(app).ended(result.id)) == len(deliveries(app).started(result.id))
            ),
            REDELIVERY_TIMEOUT,
            "every delivery to end",
        )

    # Then: exactly one outcome is written, the new holder's: Celery's result, the cached
    # value, the run record and the done marker; the stale holder said it lost its claim.
    assert counter(app, f"exec:{key}") == 2
    assert AsyncResult(result.id, app=app).get(timeout=5) == value
    assert tasks.fenced.delay(key, "unused-gate").get(timeout=10) == value  # from the cache
    run = load_run(app, result.id)
    assert not history_problems(run, result.id)
    assert run.run_count == 2, f"the stale holder's record won: {run.history_names()}"
    done = claim_holder(app, result.id)
    assert done and done.startswith("done:") and done.endswith(f"-{value['pid']}"), done
    lost = [line for line in holder.log_text().splitlines() if "lost its claim" in line]
    assert any(result.id in line for line in lost), holder.tail()
