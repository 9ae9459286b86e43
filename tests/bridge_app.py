"""The Celery app the bridge tests run in real workers, in-process and as ``celery worker``.

``make_app(broker, backend, queue)`` builds an app with every test task registered; the module's
``app`` is configured from ``BRIDGE_BROKER_URL``, ``BRIDGE_BACKEND_URL`` and ``BRIDGE_QUEUE``
so that ``celery -A tests.bridge_app worker`` serves the same tasks in a subprocess.

Tasks talk to the test through Redis keys on the result backend (``side``): counters of how
often a function body ran, gates a test opens, lists that record an order of events. Every key
a test uses is unique to it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from celery import Celery

from celery_taskengine import task
from celery_taskengine.cache_policies import INPUTS

#: How long a task waits for a gate the test opens, at most (seconds).
GATE_TIMEOUT = 30.0


def make_app(broker: str, backend: str, queue: str) -> tuple[Celery, SimpleNamespace]:
    """A Celery app on ``broker``/``backend`` whose tasks use ``queue``, and its test tasks."""
    app = Celery("cte-bridge", set_as_current=False)
    app.conf.update(
        broker_url=broker,
        result_backend=backend,
        task_default_queue=queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_send_task_events=True,
        worker_prefetch_multiplier=4,
        broker_connection_retry_on_startup=True,
        # AMQP heartbeats also wake a worker's event loop: without them an idle in-process
        # worker can take ~10 s to notice a shutdown request or flush its buffered events.
        broker_heartbeat=4,
        result_expires=600,
    )
    return app, _register_tasks(app)


def side(app: Celery) -> Any:
    """The redis client the tasks and tests share side-channel keys on."""
    return app.backend.client


def wait_for_gate(app: Celery, gate: str) -> None:
    deadline = time.monotonic() + GATE_TIMEOUT
    while not side(app).exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate!r} was never opened")
        time.sleep(0.01)


def _register_tasks(app: Celery) -> SimpleNamespace:
    @app.task(name="bridge.probe", shared=False)
    def probe() -> str:
        return "ok"

    @app.task(name="bridge.plain_add", shared=False)
    def plain_add(a: int, b: int) -> int:
        return a + b

    @app.task(name="bridge.plain_sum", shared=False)
    def plain_sum(values: list[int]) -> int:
        return sum(values)

    @task(app=app, name="bridge.add")
    def add(a: int, b: int) -> int:
        return a + b

    @task(app=app, name="bridge.counted_add")
    def counted_add(a: int, b: int, counter: str) -> int:
        side(app).incr(counter)
        return a + b

    @task(app=app, name="bridge.fail")
    def fail(message: str) -> None:
        raise ValueError(message)

    @task(app=app, name="bridge.flaky", retries=2, retry_delay_seconds=1)
    def flaky(counter: str, failures: int, done: str = "") -> str:
        """Fails ``failures`` times (counted on Redis, so across deliveries), then succeeds."""
        if side(app).incr(counter) <= failures:
            raise ConnectionError("not yet")
        if done:
            side(app).rpush(done, "flaky")
        return "finally"

    @task(app=app, name="bridge.flaky_int", retries=2, retry_delay_seconds=0.5)
    def flaky_int(counter: str, failures: int, value: int) -> int:
        if side(app).incr(counter) <= failures:
            raise ConnectionError("not yet")
        return value

    @task(app=app, name="bridge.slow_retry", retries=1, retry_delay_seconds=2)
    def slow_retry(counter: str, done: str) -> str:
        """Fails once, then waits 2 s on the broker before its second attempt."""
        if side(app).incr(counter) == 1:
            raise ConnectionError("first attempt fails")
        side(app).rpush(done, "slow_retry")
        return "retried"

    @task(app=app, name="bridge.mark")
    def mark(done: str, label: str) -> str:
        side(app).rpush(done, label)
        return label

    @task(app=app, name="bridge.gated_flaky", retries=3, retry_delay_seconds=0)
    def gated_flaky(counter: str, started: str, gate: str) -> str:
        """Attempt 1 waits for ``gate`` and fails; a later attempt would succeed."""
        if side(app).incr(counter) == 1:
            side(app).set(started, 1)
            wait_for_gate(app, gate)
            raise ConnectionError("first attempt fails")
        return "ran again"

    @task(app=app, name="bridge.blocker")
    def blocker(started: str, gate: str) -> str:
        side(app).set(started, 1)
        wait_for_gate(app, gate)
        return "unblocked"

    @task(app=app, name="bridge.sleepy", timeout_seconds=0.5)
    def sleepy(seconds: float) -> str:
        time.sleep(seconds)
        return "woke up"

    @task(app=app, name="bridge.long_running")
    def long_running(started: str, seconds: float) -> str:
        side(app).set(started, os.getpid())
        time.sleep(seconds)
        return "done"

    @task(app=app, name="bridge.crash_once", acks_late=True, reject_on_worker_lost=True)
    def crash_once(counter: str) -> str:
        """The first delivery kills its own worker process mid-run; the redelivery succeeds."""
        if side(app).incr(counter) == 1:
            os._exit(1)  # a worker dying hard: no exception, no cleanup
        return "survived"

    @task(app=app, name="bridge.loop_id")
    async def loop_id() -> list[int]:
        await asyncio.sleep(0)
        return [os.getpid(), id(asyncio.get_running_loop())]

    @task(app=app, name="bridge.async_add")
    async def async_add(a: int, b: int) -> int:
        await asyncio.sleep(0.01)
        return a + b

    @task(app=app, name="bridge.gen_gated")
    def gen_gated(count: int, gate: str) -> Iterator[int]:
        """Yields 0, then waits for ``gate`` before yielding the rest."""
        yield 0
        wait_for_gate(app, gate)
        yield from range(1, count)

    @task(app=app, name="bridge.gen_fail")
    def gen_fail() -> Iterator[int]:
        yield 1
        raise ValueError("generator broke")

    @task(app=app, name="bridge.agen")
    async def agen(count: int) -> Any:
        for i in range(count):
            await asyncio.sleep(0)
            yield i

    @task(app=app, name="bridge.cached", cache_policy=INPUTS)
    def cached(x: int, counter: str) -> int:
        side(app).incr(counter)
        return x * 10

    @task(app=app, name="bridge.per_workflow", persist_result=True)
    def per_workflow(x: int, counter: str) -> int:
        """DEFAULT policy: inputs, source and RUN_ID (the workflow's root id in a worker)."""
        side(app).incr(counter)
        return x + 100

    return SimpleNamespace(
        **{
            t.name.removeprefix("bridge."): t
            for t in app.tasks.values()
            if t.name.startswith("bridge.")
        }
    )


app, tasks = make_app(
    os.environ.get("BRIDGE_BROKER_URL", "redis://127.0.0.1:6379/0"),
    os.environ.get("BRIDGE_BACKEND_URL", "redis://127.0.0.1:6379/0"),
    os.environ.get("BRIDGE_QUEUE", "cte-bridge"),
)
