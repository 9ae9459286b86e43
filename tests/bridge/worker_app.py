"""A Celery app for bridge tests run by real ``celery worker`` subprocesses.

Broker and backend come from ``BRIDGE_BROKER_URL`` / ``BRIDGE_BACKEND_URL``.
"""

from __future__ import annotations

import os
import time

from celery import Celery

from celery_taskengine import task
from celery_taskengine.cache_policies import INPUTS

app = Celery(
    "bridge_tests",
    broker=os.environ.get("BRIDGE_BROKER_URL", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("BRIDGE_BACKEND_URL", "redis://127.0.0.1:6379/1"),
)
app.conf.update(worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)


@task(app=app, name="bridge.sleepy", timeout_seconds=0.5)
def sleepy(seconds: float) -> str:
    time.sleep(seconds)
    return "woke up"


@task(app=app, name="bridge.pid")
def pid() -> int:
    return os.getpid()


_attempts: dict[str, int] = {}


@task(app=app, name="bridge.retry_once", retries=1, retry_delay_seconds=3)
def retry_once() -> str:
    from celery import current_task

    task_id = current_task.request.id if current_task else "-"
    _attempts[task_id] = _attempts.get(task_id, 0) + 1
    if _attempts[task_id] == 1:
        raise ConnectionError("first attempt fails")
    time.sleep(1)  # long enough for a monitor to see Retrying
    return "second attempt"


@task(app=app, name="bridge.remembered", cache_policy=INPUTS)
def remembered(x: int) -> int:
    return x * x
