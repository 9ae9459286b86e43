"""The Celery app the fault matrix runs in ``celery worker`` subprocesses.

The same body as each kind of engine task: a ``def``, an ``async def`` and a generator. Each
counts its executions on a *side* Redis that no fault touches (``MATRIX_SIDE_URL``; the tests
use the broker's server, database 1), so a count survives a backend that is stopped, full,
read-only or forbidden to the worker:

``exec:<key>``
    bodies that started (more than one is a body executed twice);
``finished:<key>``
    bodies that got to the end.

Broker, backend and queue come from the environment exactly as for
:mod:`tests.reliability.worker_app` (``RELIABILITY_*``), whose deployment settings (late acks,
short visibility timeout, backend writes retried) this app shares.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import redis
from celery import Celery

from celery_taskengine import task
from tests.reliability.worker_app import DEFAULT_VISIBILITY_TIMEOUT, make_app

#: Task names by kind, as the matrix names the kinds.
TASK_NAMES = {"sync": "matrix.sync", "async": "matrix.async", "generator": "matrix.generator"}

_side: dict[str, Any] = {}


def side() -> Any:
    """The side Redis client of this process (created after a fork, never shared across one)."""
    pid = os.getpid()
    if _side.get("pid") != pid:
        _side.update(pid=pid, client=redis.Redis.from_url(os.environ["MATRIX_SIDE_URL"]))
    return _side["client"]


def _started(key: str) -> int:
    return int(side().incr(f"exec:{key}"))


def _finished(key: str) -> None:
    side().incr(f"finished:{key}")


def expected_value(kind: str, key: str, execution: int) -> Any:
    """What a run of ``kind`` returns to Celery when its ``execution``-th body committed."""
    if kind == "generator":
        return [key, execution]  # Celery's result of a generator task: its items
    return {"key": key, "execution": execution}


def register(app: Celery) -> SimpleNamespace:
    """Register the three kinds on ``app``; returns them by kind."""
    options: dict[str, Any] = {"app": app, "acks_late": True, "reject_on_worker_lost": True}

    @task(name=TASK_NAMES["sync"], **options)
    def sync_body(key: str, sleep: float) -> dict[str, Any]:
        execution = _started(key)
        time.sleep(sleep)
        _finished(key)
        return {"key": key, "execution": execution}

    @task(name=TASK_NAMES["async"], **options)
    async def async_body(key: str, sleep: float) -> dict[str, Any]:
        execution = _started(key)
        await asyncio.sleep(sleep)
        _finished(key)
        return {"key": key, "execution": execution}

    @task(name=TASK_NAMES["generator"], **options)
    def generator_body(key: str, sleep: float) -> Iterator[Any]:
        execution = _started(key)
        yield key
        time.sleep(sleep)
        _finished(key)
        yield execution

    return SimpleNamespace(sync=sync_body, generator=generator_body, **{"async": async_body})


def make_matrix_app(
    broker: str, backend: str, queue: str, *, visibility_timeout: float
) -> tuple[Celery, SimpleNamespace]:
    app, _reliability_tasks = make_app(
        broker, backend, queue, visibility_timeout=visibility_timeout
    )
    return app, register(app)


app, tasks = make_matrix_app(
    os.environ.get("RELIABILITY_BROKER_URL", "redis://127.0.0.1:6379/0"),
    os.environ.get("RELIABILITY_BACKEND_URL") or "redis://127.0.0.1:6379/0",
    os.environ.get("RELIABILITY_QUEUE", "matrix"),
    visibility_timeout=float(
        os.environ.get("RELIABILITY_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT)
    ),
)
