"""The Celery bridge in real ``celery worker`` processes: the prefork pool and the solo pool.

These are the pools where a task runs in a process's main thread (SIGALRM timeouts), where
``async def`` tasks need a loop per forked child, and where ``revoke(terminate=True)`` or a
dying child ends an attempt from outside the engine.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import pytest
from celery.result import AsyncResult

from celery_taskengine import get_task_run, stream
from celery_taskengine.errors import TaskRunTimeoutError
from tests.bridge_app import side
from tests.bridge_workers import Worker, subprocess_worker, wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module", params=["prefork", "solo"])
def worker(request: pytest.FixtureRequest, redis_server: str) -> Iterator[Worker]:
    """A ``celery worker`` subprocess (prefork with two children, or solo) on Redis."""
    url = f"{redis_server}/0"
    with subprocess_worker(url, url, pool=request.param, concurrency=2) as running:
        yield running


@pytest.fixture
def prefork(worker: Worker) -> Worker:
    if worker.pool != "prefork":
        pytest.skip("only the prefork pool can terminate a running task or lose a child")
    return worker


def history(w: Worker, result: AsyncResult) -> list[str]:
    run = get_task_run(result.id, app=w.app)
    return run.history_names() if run is not None else []


def test_a_task_returns_its_value_and_records_its_run(worker: Worker) -> None:
    result = worker.tasks.add.delay(20, 22)

    assert result.get(timeout=10) == 42
    assert history(worker, result) == ["Pending", "Running", "Completed"]


def test_a_sync_task_times_out_in_the_worker_process(worker: Worker) -> None:
    result = worker.tasks.sleepy.delay(5)

    with pytest.raises(TaskRunTimeoutError, match=r"0\.5 second"):
        result.get(timeout=4)
    assert history(worker, result) == ["Pending", "Running", "TimedOut"]


def test_a_delayed_retry_continues_the_same_run_in_a_worker_process(worker: Worker) -> None:
    result = worker.tasks.flaky.delay(worker.key("counter"), 1)

    assert result.get(timeout=15) == "finally"
    expected = ["Pending", "Running", "AwaitingRetry", "Retrying", "Completed"]
    assert history(worker, result) == expected


def test_async_tasks_reuse_one_event_loop_per_worker_process(worker: Worker) -> None:
    answers = [r.get(timeout=10) for r in [worker.tasks.loop_id.delay() for _ in range(6)]]

    loops_by_process: dict[int, set[int]] = defaultdict(set)
    for pid, loop in answers:
        loops_by_process[pid].add(loop)
    assert all(len(loops) == 1 for loops in loops_by_process.values())
    assert len(loops_by_process) < len(answers)  # some process served several tasks


def test_a_generator_tasks_items_stream_from_a_worker_process(worker: Worker) -> None:
    gate = worker.key("gate")
    result = worker.tasks.gen_gated.delay(4, gate)
    items = stream(result, timeout=20)

    assert next(items) == 0
    side(worker.app).set(gate, 1)
    assert list(items) == [1, 2, 3]
    assert result.get(timeout=10) == [0, 1, 2, 3]


def test_revoking_a_running_task_with_terminate_ends_its_run_cancelled(prefork: Worker) -> None:
    started = prefork.key("started")
    result = prefork.tasks.long_running.delay(started, 30)
    wait_for(lambda: side(prefork.app).exists(started), what="the task to start")
    wait_for(lambda: history(prefork, result) == ["Pending", "Running"], what="Running")

    result.revoke(terminate=True)

    # The killed attempt may record its crash first; the run ends Cancelled either way.
    wait_for(lambda: history(prefork, result)[-1:] == ["Cancelled"], what="Cancelled")
    run = get_task_run(result.id, app=prefork.app)
    assert run.history_names() in (
        ["Pending", "Running", "Cancelled"],
        ["Pending", "Running", "Crashed", "Cancelled"],
    )
    assert run.state.message.startswith("The task run was terminated")
    wait_for(lambda: AsyncResult(result.id, app=prefork.app).state == "REVOKED", what="REVOKED")


def test_a_revoke_between_two_attempts_in_a_pool_child_cancels_the_run(prefork: Worker) -> None:
    # Given: the first attempt runs in a pool child, which never sees the worker's revoked set.
    counter, started, gate = prefork.key("counter"), prefork.key("started"), prefork.key("gate")
    result = prefork.tasks.gated_flaky.delay(counter, started, gate)
    wait_for(lambda: side(prefork.app).exists(started), what="the first attempt")

    # When: it is revoked (no terminate: the attempt runs on, then fails and would retry).
    result.revoke()
    wait_for(lambda: _revoked_by_the_worker(prefork, result.id), what="the worker to learn of it")
    side(prefork.app).set(gate, 1)

    # Then: the engine sees the revoke before the second attempt.
    expected = ["Pending", "Running", "Retrying", "Cancelled"]
    wait_for(lambda: history(prefork, result) == expected, what="Cancelled")
    assert int(side(prefork.app).get(counter)) == 1
    wait_for(lambda: AsyncResult(result.id, app=prefork.app).state == "REVOKED", what="REVOKED")


def _revoked_by_the_worker(w: Worker, task_id: str) -> bool:
    replies = w.app.control.inspect(timeout=1.0).revoked() or {}
    return any(task_id in ids for ids in replies.values())


def test_a_child_killed_mid_run_leaves_it_crashed_and_the_redelivery_continues_it(
    prefork: Worker,
) -> None:
    counter = prefork.key("counter")
    result = prefork.tasks.crash_once.delay(counter)

    assert result.get(timeout=30) == "survived"
    run = get_task_run(result.id, app=prefork.app)
    assert run.history_names() == ["Pending", "Running", "Crashed", "Retrying", "Completed"]
    assert run.run_count == 2
    assert int(side(prefork.app).get(counter)) == 2
