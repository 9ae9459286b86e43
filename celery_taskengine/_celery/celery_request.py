"""Celery's ``self.request`` and ``self.retry()`` inside an engine run.

A bound task (``bind=True``) written for Celery reads ``self.request.id`` and
``self.request.retries`` and calls ``self.retry(exc=..., countdown=...)``. On an engine task the
request describes the run (its id is the run id, ``retries`` the attempt number - 1, as Celery
counts), locally as in a worker; and ``retry`` asks the engine for the retry, which is then
scheduled (AwaitingRetry) and counted like any other, instead of a message sent behind the
engine's back.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery.app.task import Context

from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine.errors import RetryRequested

if TYPE_CHECKING:
    from celery_taskengine._celery.task import Task

__all__ = ["delivered_request", "delivering", "engine_request", "lineage", "request_retry"]

#: Celery's request of the delivery a worker is running, where Celery's own thread-local
#: request stack does not reach: an attempt's timeout thread (contextvars are copied to it)
#: and the worker loop running ``async def`` tasks (see worker_loop).
_delivered: ContextVar[Context | None] = ContextVar("taskengine_delivered", default=None)


@contextlib.contextmanager
def delivering(request: Context | None) -> Iterator[None]:
    """Within: ``request`` is the delivery's, for :func:`delivered_request`."""
    token = _delivered.set(request)
    try:
        yield
    finally:
        _delivered.reset(token)


def delivered_request() -> Context | None:
    """Celery's request of the delivery this context belongs to, if any."""
    return _delivered.get()


def lineage(app: Any) -> dict[str, str]:
    """``root_id`` and ``parent_id`` for a task sent from a delivery's run where Celery cannot
    tell (its ``current_worker_task`` is thread-local: empty in a timeout thread or on the
    worker loop); empty where Celery can, or outside a delivery."""
    request = _delivered.get()
    if request is None or app.current_task is not None:  # this thread has Celery's stack
        return {}
    return {"root_id": request.root_id or request.id, "parent_id": request.id}


def engine_request(task: Task, run: TaskRun, stacked: Context | None) -> Context:
    """The request ``task`` sees while its function runs for ``run``.

    In a worker that is Celery's request for the delivery, with ``retries`` counting the
    attempts made in this delivery too (a retry without delay does not go through the
    broker); locally a request like a direct call's, with the run's id.
    """
    retries = max(run.run_count - 1, 0)
    if stacked is not None and stacked.id == run.id:
        if stacked.retries == retries:
            return stacked
        return Context(vars(stacked), retries=retries)
    return Context(
        id=run.id,
        task=task.name,
        retries=retries,
        args=(),
        kwargs=dict(run.parameters),
        root_id=run.id,
        headers={},
        delivery_info={},
        hostname=_hostname(),
        called_directly=True,
    )


def request_retry(
    task: Task,
    run: TaskRun,
    *,
    exc: BaseException | None,
    throw: bool,
    eta: datetime | None,
    countdown: float | None,
    max_retries: int | None,
    unsupported: dict[str, Any],
) -> RetryRequested:
    """``self.retry()`` for a run of ``task``: raise (or return) the engine's retry request.

    As in Celery, past the retry limit ``exc`` is raised (else ``MaxRetriesExceededError``);
    ``max_retries`` may lower the task's limit for this call, never raise it: the limit is
    ``retries``, or Celery's default 3 for a task whose options name no count. A retry
    with other arguments or options is a ``TypeError``: a run keeps its parameters; only
    ``expires`` is taken, for the message that carries the retry (in a worker).
    """
    message_options = _message_options(task, unsupported)
    limit = task.engine_options.retry_limit
    if max_retries is not None:
        limit = min(limit, max_retries)
    if run.run_count > limit:
        if exc is not None:
            raise exc
        raise task.MaxRetriesExceededError(
            f"Can't retry {task.name}[{run.id}] args:() kwargs:{run.parameters}",
            task_args=(),
            task_kwargs=dict(run.parameters),
        )
    request = RetryRequested(exc, _delay(task, eta, countdown), limit, message_options)
    if throw:
        raise request
    return request


def _message_options(task: Task, unsupported: dict[str, Any]) -> dict[str, Any]:
    """What of ``self.retry()``'s other options the retry's message takes (``expires``); a
    ``TypeError`` for the rest: a run keeps its arguments and options across retries."""
    message_options = {"expires": unsupported.pop("expires")} if "expires" in unsupported else {}
    if unsupported:
        names = ", ".join(f"{name}=" for name in sorted(unsupported))
        raise TypeError(
            f"self.retry({names}) is not supported on engine task {task.name!r}: a run keeps "
            "its arguments and options across retries (give exc=, countdown=, eta=, "
            "max_retries=, expires= or throw=)"
        )
    return message_options


def _delay(task: Task, eta: datetime | None, countdown: float | None) -> float | None:
    """Seconds the retry waits: ``countdown`` or until ``eta``; else the task's retry delays,
    or Celery's ``default_retry_delay`` for a task that has none."""
    if countdown is not None:
        return float(countdown)
    if eta is not None:
        return max(0.0, eta.timestamp() - time.time())
    if task.engine_options.retry_delays:
        return None
    return float(task.default_retry_delay)


_host: list[str] = []


def _hostname() -> str:
    if not _host:
        _host.append(socket.gethostname())
    return _host[0]
