"""A Celery app whose workers record Celery's task signals and ``Task`` method calls into Redis.

Each engine task has a plain Celery twin that behaves the same, so a test can compare what a
Celery user sees for both. Records go to the list ``signals:<task id>`` on the result backend,
from whichever worker process fires them. Broker and backend come from ``BRIDGE_BROKER_URL`` /
``BRIDGE_BACKEND_URL``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery
from celery import Task as CeleryTask
from celery.signals import (
    task_failure,
    task_internal_error,
    task_postrun,
    task_prerun,
    task_retry,
    task_revoked,
    task_success,
)

import celery_taskengine
from celery_taskengine import task

app = Celery(
    "signals_tests",
    broker=os.environ.get("BRIDGE_BROKER_URL", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("BRIDGE_BACKEND_URL", "redis://127.0.0.1:6379/1"),
)
app.conf.update(worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)


def record(kind: str, task_id: Any, **fields: Any) -> None:
    entry = json.dumps({"signal": kind, **fields}, default=repr, sort_keys=True)
    app.backend.client.rpush(f"signals:{task_id}", entry)


def _ours(sender: Any) -> bool:
    return str(getattr(sender, "name", "")).startswith("sig.")


@task_prerun.connect
def _prerun(sender: Any, task_id: str, task: Any, args: Any, kwargs: Any, **_: Any) -> None:
    if _ours(sender):
        record("task_prerun", task_id, args=list(args), kwargs=kwargs, same=task is sender)


@task_postrun.connect
def _postrun(
    sender: Any, task_id: str, args: Any, kwargs: Any, retval: Any, state: str, **_: Any
) -> None:
    if _ours(sender):
        record("task_postrun", task_id, args=list(args), retval=_value(retval), state=state)


@task_success.connect
def _success(sender: Any, result: Any, **_: Any) -> None:
    if _ours(sender):
        record("task_success", sender.request.id, result=result)


@task_failure.connect
def _failure(
    sender: Any, task_id: str, exception: Any, args: Any, kwargs: Any, einfo: Any, **kw: Any
) -> None:
    if _ours(sender):
        record(
            "task_failure",
            task_id,
            exception=repr(exception),
            args=list(args),
            kwargs=kwargs,
            traceback=kw.get("traceback") is not None,
            einfo=repr(einfo.exception),
        )


@task_retry.connect
def _retry(sender: Any, request: Any, reason: Any, einfo: Any, **_: Any) -> None:
    if _ours(sender):
        record(
            "task_retry",
            request.id,
            retries=request.retries,
            reason=type(reason).__name__,
            exc=repr(reason.exc),
            when=reason.when,
            einfo=type(einfo.exception).__name__,
        )


@task_revoked.connect
def _revoked(
    sender: Any, request: Any, terminated: Any, signum: Any, expired: Any, **_: Any
) -> None:
    if _ours(sender):
        record("task_revoked", request.id, terminated=terminated, expired=expired, signum=signum)


@task_internal_error.connect
def _internal(sender: Any, task_id: str, exception: Any, request: Any, **_: Any) -> None:
    if _ours(sender):
        record("task_internal_error", task_id, exception=repr(exception))


def _value(value: Any) -> Any:
    return repr(value) if isinstance(value, BaseException) else value


class Recording:
    """Overrides of Celery's handlers, none calling ``super()``, as users write them."""

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        record("before_start", task_id, args=list(args))

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        record("on_success", task_id, retval=retval, args=list(args), kwargs=kwargs)

    def on_failure(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        record("on_failure", task_id, exc=repr(exc), args=list(args), einfo=repr(einfo.exception))

    def on_retry(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        record(
            "on_retry",
            task_id,
            exc=repr(exc),
            args=list(args),
            einfo=type(einfo.exception).__name__,
        )

    def after_return(
        self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        record("after_return", task_id, status=status, retval=_value(retval), einfo=einfo)


class Audited(Recording, celery_taskengine.Task):
    pass


class AuditedPlain(Recording, CeleryTask):
    pass


class BrokenOnFailure(celery_taskengine.Task):
    def on_failure(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        raise RuntimeError("on_failure broke")


class BrokenOnFailurePlain(CeleryTask):
    def on_failure(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        raise RuntimeError("on_failure broke")


def _first_attempt(counter: str) -> bool:
    return int(app.backend.client.incr(counter)) == 1


@task(app=app, name="sig.engine_double", base=Audited)
def engine_double(x: int) -> int:
    return x * 2


@app.task(name="sig.plain_double", base=AuditedPlain)
def plain_double(x: int) -> int:
    return x * 2


@task(app=app, name="sig.engine_fail", base=Audited)
def engine_fail(message: str) -> None:
    raise ValueError(message)


@app.task(name="sig.plain_fail", base=AuditedPlain)
def plain_fail(message: str) -> None:
    raise ValueError(message)


@task(app=app, name="sig.engine_retry", base=Audited, retries=1, retry_delay_seconds=2)
def engine_retry(counter: str) -> str:
    if _first_attempt(counter):
        raise ConnectionError("first attempt fails")
    return "second attempt"


@app.task(name="sig.plain_retry", base=AuditedPlain, bind=True, max_retries=1)
def plain_retry(self: Any, counter: str) -> str:
    if _first_attempt(counter):
        raise self.retry(exc=ConnectionError("first attempt fails"), countdown=2)
    return "second attempt"


@task(app=app, name="sig.engine_internal", base=BrokenOnFailure)
def engine_internal() -> None:
    raise ValueError("body fails")


@app.task(name="sig.plain_internal", base=BrokenOnFailurePlain)
def plain_internal() -> None:
    raise ValueError("body fails")


@task(app=app, name="sig.engine_revoked", retries=2, retry_delay_seconds=0)
def engine_revoked(started: str, gate: str) -> str:
    client = app.backend.client
    client.set(started, "1")
    deadline = time.monotonic() + 30
    while not client.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    raise ConnectionError("fails, to be retried at once")
