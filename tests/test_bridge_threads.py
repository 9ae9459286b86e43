"""The Celery bridge in a threads-pool worker, where Celery enforces no time limits and the
consumer stays free while tasks run (so a revoke arrives during an attempt)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery.result import AsyncResult

from celery_taskengine import get_task_run
from celery_taskengine.errors import TaskRunTimeoutError
from tests.bridge_app import side
from tests.bridge_workers import Worker, in_process_worker, wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def worker(redis_server: str) -> Iterator[Worker]:
    """A threads-pool worker with two threads, Redis as broker and backend."""
    url = f"{redis_server}/0"
    with in_process_worker(url, url, pool="threads", concurrency=2) as running:
        yield running


def history(w: Worker, result: AsyncResult) -> list[str]:
    run = get_task_run(result.id, app=w.app)
    return run.history_names() if run is not None else []


def test_a_sync_task_times_out_in_the_threads_pool(worker: Worker) -> None:
    result = worker.tasks.sleepy.delay(5)

    with pytest.raises(TaskRunTimeoutError):
        result.get(timeout=4)
    assert history(worker, result) == ["Pending", "Running", "TimedOut"]


def test_async_tasks_in_different_pool_threads_share_the_process_loop(worker: Worker) -> None:
    results = [worker.tasks.loop_id.delay() for _ in range(4)]

    assert len({tuple(r.get(timeout=10)) for r in results}) == 1


def test_a_revoke_between_two_attempts_cancels_the_run(worker: Worker) -> None:
    counter, started, gate = worker.key("counter"), worker.key("started"), worker.key("gate")
    result = worker.tasks.gated_flaky.delay(counter, started, gate)
    wait_for(lambda: side(worker.app).exists(started), what="the first attempt")

    result.revoke()  # the attempt runs on; the engine sees the revoke before the next one
    wait_for(lambda: result.id in _revoked_in_this_process(), what="the worker to learn of it")
    side(worker.app).set(gate, 1)

    expected = ["Pending", "Running", "Retrying", "Cancelled"]
    wait_for(lambda: history(worker, result) == expected, what="Cancelled")
    assert int(side(worker.app).get(counter)) == 1
    wait_for(lambda: AsyncResult(result.id, app=worker.app).state == "REVOKED", what="REVOKED")


def _revoked_in_this_process() -> object:
    from celery.worker.state import revoked  # the in-process worker's revoked set

    return revoked
