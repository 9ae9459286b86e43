"""A timeout must hold whatever the function is doing when the deadline comes (SPEC §4).

Found by the soak: under load, runs whose deadline fell inside a Redis call did not end
TimedOut. In a prefork worker (as in any main thread) the engine bounds a sync attempt with
SIGALRM, whose handler raises ``TaskRunTimeoutError``, a ``TimeoutError``, which in Python 3.10+
is also ``socket.timeout``. Raised inside redis-py's socket read it is taken for a socket
timeout: redis-py raises ``redis.exceptions.TimeoutError("Timeout reading from socket")``
instead (the run ends Failed with that message), or, on a client that retries on timeouts
(redis-py's default ``redis.Redis()``), retries the command, and the attempt runs on past its
deadline to Completed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_taskengine.errors import TaskRunTimeoutError
from tests.reliability.harness import WorkerProcess, load_run, outcome_of, reliability_app, workers

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def rel(redis_url: str) -> Iterator[tuple[Any, Any]]:
    with reliability_app(redis_url) as app_and_tasks:
        yield app_and_tasks


def test_a_deadline_that_falls_inside_a_redis_call_still_times_the_attempt_out(
    rel: tuple[Any, Any], tmp_path: Path
) -> None:
    app, tasks = rel
    assert tasks.blocked_in_redis.engine_options.timeout_seconds == 0.1
    with workers(WorkerProcess(app, tmp_path, concurrency=1)):
        # When: the 0.1 s deadline comes while the body waits 1 s inside one Redis call.
        result = tasks.blocked_in_redis.delay(uuid.uuid4().hex, 1.0)
        outcome = outcome_of(result, timeout=30)

    # Then: the attempt timed out, as one blocked in time.sleep would.
    run = load_run(app, result.id)
    assert run.history_names() == ["Pending", "Running", "TimedOut"], f".get() gave {outcome!r}"
    assert isinstance(outcome, TaskRunTimeoutError)
