"""The app the deployment tests run in ``celery worker`` subprocesses, configured from the
environment: ``DEPLOY_BROKER``, ``DEPLOY_BACKEND``, ``DEPLOY_STORE`` (``taskengine_store``,
optional), ``DEPLOY_QUEUE`` and ``DEPLOY_SIDE`` (a Redis URL where tasks count executions).
"""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace
from typing import Any

import redis
from celery import Celery

from celery_taskengine import task
from celery_taskengine.cache_policies import INPUTS
from celery_taskengine.transactions import IsolationLevel


def make_app(
    broker: str,
    backend: str,
    store: str | None,
    queue: str,
    side_url: str,
    backend_options: dict[str, Any] | None = None,
) -> tuple[Celery, SimpleNamespace]:
    """An app on ``broker``/``backend`` (and ``store``), with the deployment tests' tasks;
    ``backend_options`` become ``result_backend_transport_options`` (Sentinel's master)."""
    app = Celery("cte-deploy", set_as_current=False)
    app.conf.update(
        broker_url=broker,
        result_backend=backend,
        task_default_queue=queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        result_expires=600,
        result_backend_transport_options=backend_options or {},
    )
    if store:
        app.conf.taskengine_store = store
    side = redis.Redis.from_url(side_url)

    @app.task(name="deploy.probe")
    def probe() -> str:
        return "ok"

    @task(app=app, name="deploy.cached", cache_policy=INPUTS)
    def cached(x: int, counter: str) -> int:
        side.incr(counter)
        return x * 10

    @task(app=app, name="deploy.flaky", retries=1, retry_delay_seconds=0.5)
    def flaky(counter: str) -> int:
        attempt = int(side.incr(counter))
        if attempt == 1:
            raise ConnectionError("first attempt fails")
        return os.getpid()

    @task(app=app, name="deploy.slow", cache_policy=INPUTS)
    def slow(x: int, counter: str, seconds: float) -> int:
        side.incr(counter)
        time.sleep(seconds)
        return x + 1

    serial_policy = INPUTS.configure(isolation_level=IsolationLevel.SERIALIZABLE)

    @task(app=app, name="deploy.serial", cache_policy=serial_policy)
    def serial(x: int, counter: str) -> int:
        side.incr(counter)
        time.sleep(1.0)  # long enough for the other process to wait on the lock
        return x * 3

    @task(app=app, name="deploy.always_fails", retries=1, retry_delay_seconds=0.2)
    def always_fails(counter: str) -> None:
        side.rpush(counter, os.getpid())
        raise ConnectionError("fails every time")

    def who(self: Any, spawn: Any) -> dict[str, Any]:
        """What ``self.request`` says in the run's thread, and the id of a child sent from it."""
        request = self.request
        return {
            "id": request.id,
            "hostname": request.hostname,
            "routing_key": (request.delivery_info or {}).get("routing_key"),
            "called_directly": request.called_directly,
            "root_id": request.root_id,
            "parent_id": request.parent_id,
            "child": spawn.delay(None).id if spawn else None,
        }

    # timeout_seconds: outside a main thread the attempt runs in a helper thread
    @task(app=app, name="deploy.whoami", bind=True, timeout_seconds=30)
    def whoami(self: Any, spawn: bool | None) -> dict[str, Any]:
        return who(self, whoami if spawn else None)

    @task(app=app, name="deploy.awhoami", bind=True)  # runs on the worker's event loop
    async def awhoami(self: Any, spawn: bool | None) -> dict[str, Any]:
        return who(self, awhoami if spawn else None)

    @app.task(name="deploy.plain_big")
    def plain_big(size: int) -> str:
        return "x" * size

    @task(app=app, name="deploy.big")
    def big(size: int) -> str:
        return "x" * size

    return app, SimpleNamespace(
        plain_big=plain_big,
        big=big,
        whoami=whoami,
        awhoami=awhoami,
        probe=probe,
        cached=cached,
        flaky=flaky,
        slow=slow,
        serial=serial,
        always_fails=always_fails,
        side=side,
    )


app, tasks = make_app(
    os.environ.get("DEPLOY_BROKER", "redis://127.0.0.1:6379/0"),
    os.environ.get("DEPLOY_BACKEND", "redis://127.0.0.1:6379/0"),
    os.environ.get("DEPLOY_STORE") or None,
    os.environ.get("DEPLOY_QUEUE", "cte-deploy"),
    os.environ.get("DEPLOY_SIDE", "redis://127.0.0.1:6379/0"),
    json.loads(os.environ.get("DEPLOY_BACKEND_OPTIONS") or "{}"),
)
