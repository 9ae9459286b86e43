"""The Celery app the bridge benchmark's worker runs (URLs come from the environment)."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from celery_taskengine import Task, task
from celery_taskengine.cache_policies import INPUTS

BROKER = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/14")
BACKEND = os.environ.get("BENCH_BACKEND_URL", "redis://127.0.0.1:6379/15")

app = Celery("bench_bridge", broker=BROKER, backend=BACKEND)
app.conf.update(worker_prefetch_multiplier=4, task_serializer="json", result_serializer="json")


@app.task(name="bench.plain_noop")
def plain_noop(i: int) -> int:
    return i


@task(app=app, name="bench.engine_noop")
def engine_noop(i: int) -> int:
    return i


@task(app=app, name="bench.engine_cached", cache_policy=INPUTS)
def engine_cached(i: int) -> int:
    return i


@task(app=app, name="bench.engine_noop_celery_store")
def engine_noop_celery_store(i: int) -> int:
    return i


def _stored_as_celery_does(self: Task) -> Any:
    return self._backend or self.app.backend


# An engine task whose outcome Celery stores as it stores a plain task's (read first): what
# the engine's fresh-delivery store (engine_backend) saves, measured in the same run.
type(engine_noop_celery_store).backend = property(_stored_as_celery_does, Task.backend.fset)
