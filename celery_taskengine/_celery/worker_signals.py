"""The engine's part of a delivery, hung on Celery's task signals instead of ``Task`` methods.

Users subclass :class:`~celery_taskengine.Task` and override ``before_start``, ``on_retry``,
``after_return`` as Celery documents, often without calling ``super()``. Were the engine's
work in those methods, such an override would silently turn it off (a delivery run as a local
call, a retry left showing Celery's RETRY, records a dropped connection lost never resent).
Celery sends these signals in the same thread, at the same points of its trace:

- ``task_prerun``, right before ``before_start`` and the body: the next call of the task is
  Celery's delivery, to be bridged (a call made inside the body runs locally);
- ``task_retry``, right after ``on_retry``: the backend shows AWAITING_RETRY, not RETRY;
- ``task_postrun``, after ``after_return``: resend records a dropped connection lost, and
  write a SQL run's outcome that found no result of Celery's to commit with.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from celery.signals import task_postrun, task_prerun, task_retry

__all__ = ["mark_delivery", "take_delivery"]

#: The engine task Celery's worker is about to call for a message, in this thread or task.
_delivery: ContextVar[Any] = ContextVar("taskengine_delivery", default=None)


def mark_delivery(task: Any) -> None:
    """Celery is about to call ``task`` for a message: that call is bridged to the engine; a
    plain ``t(...)`` made inside another task's body still runs locally."""
    _delivery.set(task)


def take_delivery(task: Any) -> bool:
    """Whether this call of ``task`` is the one Celery's worker makes for a message (then the
    mark is cleared: calls the body makes are local)."""
    if _delivery.get() is not task:
        return False
    _delivery.set(None)
    return True


def _engine_task(sender: Any) -> Any:
    return sender if getattr(sender, "engine_options", None) is not None else None


def _on_prerun(sender: Any = None, **_: Any) -> None:
    task = _engine_task(sender)
    if task is not None:
        mark_delivery(task)


def _on_retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    task = _engine_task(sender)
    if task is not None and request is not None:
        from celery_taskengine._celery.worker_retries import show_awaiting_retry

        show_awaiting_retry(task, str(request.id), reason)


def _on_postrun(sender: Any = None, task_id: Any = None, **_: Any) -> None:
    if _engine_task(sender) is not None:
        from celery_taskengine._store.sql_worker_records import write_left_outcome
        from celery_taskengine._store.worker_records import resend_orphaned_records

        resend_orphaned_records()
        if task_id is not None:
            write_left_outcome(str(task_id))


task_prerun.connect(_on_prerun, weak=False, dispatch_uid="celery_taskengine.prerun")
task_retry.connect(_on_retry, weak=False, dispatch_uid="celery_taskengine.retry")
task_postrun.connect(_on_postrun, weak=False, dispatch_uid="celery_taskengine.postrun")
