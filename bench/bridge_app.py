"""The Celery app the bridge benchmark's worker runs (URLs come from the environment)."""

from __future__ import annotations

import os

from celery import Celery

from celery_taskengine import task
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
