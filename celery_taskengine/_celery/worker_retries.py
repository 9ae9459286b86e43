"""A delayed retry in a worker, whole: from the engine's AwaitingRetry to Celery's countdown.

The engine decides the retry and its delay (``core_outcomes`` with ``retry_policy``) and ends
the delivery in AwaitingRetry, whose scheduled time is recorded (the retry's delivery, maybe
on another worker, reads it). Here the run goes back to the broker:

1. :func:`retry_later`: the countdown is what is left until the scheduled time; Celery's
   ``task.retry`` publishes the same task id with it (same canvas links) and raises ``Retry``,
   which frees the worker slot. The AWAITING_RETRY meta to show travels on that ``Retry``.
2. Celery stores RETRY and sends ``task_retry`` with that ``Retry`` as its ``reason``;
   :func:`show_awaiting_retry` (hung on the signal by ``worker_signals``) writes AWAITING_RETRY
   over it, carrying the exception and traceback Celery's RETRY would.
3. The retry's delivery continues the recorded run (``worker_delivery``): AwaitingRetry goes to
   Retrying at once, its delay already spent on the broker.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery.app.task import get_actual_ignore_result
from celery.exceptions import Retry

from celery_taskengine._store.task_meta import (
    awaiting_retry_meta,
    keeps_meta_on_redis,
    write_task_meta,
)
from celery_taskengine.states import utcnow

if TYPE_CHECKING:
    from celery_taskengine._celery.task import Task
    from celery_taskengine._engine.task_run import TaskRun

__all__ = ["retry_later", "show_awaiting_retry"]

logger = logging.getLogger(__name__)

#: The attribute of Celery's ``Retry`` carrying the AWAITING_RETRY meta to the signal.
_META = "taskengine_awaiting_retry"


def retry_later(task: Task, run: TaskRun) -> None:
    """Send ``run`` (in AwaitingRetry) back to the broker until its scheduled time; raises
    Celery's ``Retry`` (carrying the cause, as Celery's own), so the worker slot is freed."""
    state = run.state
    assert state is not None and state.is_scheduled()
    scheduled = state.scheduled_time
    countdown = max(0.0, (scheduled - utcnow()).total_seconds()) if scheduled else 0.0
    meta = awaiting_retry_meta(task.backend, run, state)
    cause = state.data if isinstance(state.data, Exception) else None
    options = getattr(cause, "message_options", None) or {}  # self.retry(expires=...)
    try:
        task.retry(exc=cause, countdown=countdown, **options)  # publishes, then raises Retry
    except Retry as retry:
        setattr(retry, _META, meta)
        raise


def show_awaiting_retry(task: Task, task_id: str, reason: Any) -> None:
    """Show AWAITING_RETRY in the backend, over the RETRY Celery just stored for our retry
    (``reason``: the ``Retry`` that :func:`retry_later` raised; any other is not ours)."""
    meta: tuple[dict[str, Any], str | None] | None = getattr(reason, _META, None)
    if meta is None or get_actual_ignore_result(task, task.request):
        return
    info, traceback = meta
    try:
        if keeps_meta_on_redis(task.app.backend):
            write_task_meta(
                task.app, task_id, "AWAITING_RETRY", info, expected="RETRY", traceback=traceback
            )
        else:  # a database or rpc:// backend: through Celery
            task.app.backend.store_result(task_id, info, "AWAITING_RETRY", traceback=traceback)
    except Exception:
        logger.warning("%s: could not store the AWAITING_RETRY state", task_id, exc_info=True)
