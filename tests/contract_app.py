"""Engine tasks for the tests of Celery's contract for results and control flow
(tests/test_celery_contract.py): each behaves as a Celery user's task would.

Tasks count their executions on Redis keys the test names (``side``), so a test sees how often
a body ran across deliveries.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from celery import Celery, current_task
from celery.exceptions import Ignore, Reject

from celery_taskengine import get_task_run, task
from tests.bridge_workers import _no_tracebacks_in_worker_threads, _release
from tests.workers import embedded_worker

#: How long a task waits for a gate the test opens, at most (seconds).
GATE_TIMEOUT = 30.0


def make_app(broker: str, backend: str, queue: str, **conf: Any) -> tuple[Celery, SimpleNamespace]:
    """An app on ``broker``/``backend`` whose tasks use ``queue``, and its tasks."""
    app = Celery("cte-contract", set_as_current=False)
    app.conf.update(
        broker_url=broker,
        result_backend=backend,
        task_default_queue=queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_heartbeat=4,
        result_expires=600,
        **conf,
    )
    return app, _register(app)


def side(app: Celery) -> Any:
    return app.backend.client


def _register(app: Celery) -> SimpleNamespace:
    @app.task(name="contract.probe", shared=False, ignore_result=False)
    def probe() -> str:
        return "ok"

    @task(app=app, name="contract.add")
    def add(x: int, y: int, z: int | None = None) -> int:
        return x + y + (z or 0)

    @task(app=app, name="contract.add_not_typed", typing=False)
    def add_not_typed(x: int, y: int) -> int:
        return x + y

    @task(app=app, name="contract.gated", retries=1, retry_delay_seconds=1)
    def gated(counter: str, gate: str, failures: int) -> int:
        """Fails ``failures`` times, then waits for ``gate`` and returns its run count."""
        count = int(side(app).incr(counter))
        if count <= failures:
            raise ConnectionError("not yet")
        deadline = time.monotonic() + GATE_TIMEOUT
        while not side(app).exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        return count

    @task(app=app, name="contract.ignoring", ignore_result=True)
    def ignoring(x: int) -> int:
        return x

    @task(app=app, name="contract.reject_once", acks_late=True, retries=2)
    def reject_once(counter: str) -> str:
        """Rejects its first delivery with requeue (as Celery's reject_then_succeed does)."""
        if int(side(app).incr(counter)) == 1:
            raise Reject("first delivery", requeue=True)
        redelivered = (current_task.request.delivery_info or {}).get("redelivered")
        return f"second pass, redelivered={bool(redelivered)}"

    @task(app=app, name="contract.reject_for_good", retries=2)
    def reject_for_good(counter: str) -> None:
        side(app).incr(counter)
        raise Reject("rejected", requeue=False)

    @task(app=app, name="contract.ignore", retries=2)
    def ignore(counter: str) -> None:
        side(app).incr(counter)
        raise Ignore()

    @task(app=app, name="contract.fail")
    def fail(message: str) -> None:
        raise ValueError(message)

    @task(app=app, name="contract.tsum")
    def tsum(values: list[int]) -> int:
        return sum(values)

    @task(app=app, name="contract.record_error")
    def record_error(request_id: str, key: str) -> str:
        """An old-style errback: Celery calls it with the failed task's id."""
        side(app).rpush(key, request_id)
        return request_id

    return SimpleNamespace(
        probe=probe,
        add=add,
        add_not_typed=add_not_typed,
        gated=gated,
        ignoring=ignoring,
        reject_once=reject_once,
        reject_for_good=reject_for_good,
        ignore=ignore,
        fail=fail,
        tsum=tsum,
        record_error=record_error,
    )


@contextlib.contextmanager
def contract_worker(broker: str, backend: str, **conf: Any) -> Iterator[SimpleNamespace]:
    """A solo in-process worker on a fresh app and queue, serving once its probe answers."""
    queue = f"cte-contract-{uuid.uuid4().hex[:10]}"
    app, tasks = make_app(broker, backend, queue, **conf)
    try:
        with _no_tracebacks_in_worker_threads(), embedded_worker(app, "solo", 1):
            assert tasks.probe.delay().get(timeout=30) == "ok"
            yield SimpleNamespace(app=app, tasks=tasks, queue=queue)
    finally:
        _release(app, queue)


def key(name: str) -> str:
    return f"test:{name}:{uuid.uuid4().hex}"


def history(app: Celery, task_id: str) -> list[str]:
    run = get_task_run(task_id, app=app)
    return run.history_names() if run is not None else []


def meta_written(app: Celery, task_id: str) -> bool:
    return bool(side(app).exists(app.backend.get_key_for_task(task_id)))


def watch_for_meta(app: Celery, task_id: str, until_final: float = 20.0) -> list[str]:
    """Poll the backend's task meta until the run is final; the statuses ever seen there."""
    seen: list[str] = []
    deadline = time.monotonic() + until_final
    while time.monotonic() < deadline:
        if meta_written(app, task_id):
            seen.append(app.backend.get_task_meta(task_id)["status"])
        run = get_task_run(task_id, app=app)
        if run is not None and run.state is not None and run.state.is_final():
            break
        time.sleep(0.005)
    else:
        raise AssertionError(f"run {task_id} did not end: {history(app, task_id)}")
    if meta_written(app, task_id):
        seen.append(app.backend.get_task_meta(task_id)["status"])
    return seen
