"""Handing a delivery back to the broker when the store stays unreachable before it runs.

A delivery reads the store before its attempt may start (its claim on the message, its run's
record) and waits out an outage there for as long as Celery's backend retries its own writes
(see :mod:`~celery_taskengine._store.retrying`). If the store is still unreachable after that,
failing the run would turn an outage a plain Celery task rides out into a failure; nothing of
the attempt has run yet, so the delivery goes back to the broker and runs later as the same
attempt.

How: a copy of the message (same task id, same ``retries``, so neither the engine nor Celery
counts an attempt) is published with a short countdown, and the delivery ends with Celery's
``Ignore`` (no state stored; a late-acknowledged message is acknowledged, its copy carries on).
``Reject(requeue=True)`` is not used: with Celery's default ``acks_late=False`` the worker
acknowledged the message when it received it, and ``Request.reject`` does nothing for an
acknowledged message, so the run would be lost. Only if the broker cannot take the copy either
is a late-acknowledged message rejected with requeue (the broker still holds it); an
early-acknowledged one has nowhere to go, and the store's error ends the delivery.

After the attempt ran, its outcome must reach the store before Celery stores its result. If the
store stays unreachable or keeps refusing the write (OOM, READONLY, NOPERM) past the same
policy, the delivery is not acknowledged with an outcome nobody can read back: a
late-acknowledged message is rejected with requeue (:func:`rejected_if_unrecorded`), logged with
the run id, and its redelivery continues the run; an early-acknowledged one ends with the
store's error, which Celery stores as the run's failure if it can.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

from celery.app.task import Task as CeleryTask
from celery.exceptions import Ignore, Reject

from celery_taskengine.errors import StoreUnavailableError

if TYPE_CHECKING:
    from celery_taskengine._celery.task import Task

__all__ = ["REQUEUE_COUNTDOWN_SECONDS", "handed_back_if_unreachable", "rejected_if_unrecorded"]

logger = logging.getLogger(__name__)

#: Seconds the copy of a handed-back delivery waits before it is run again.
REQUEUE_COUNTDOWN_SECONDS = 1.0


@contextmanager
def handed_back_if_unreachable(
    task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Iterator[None]:
    """Around a delivery's store reads before its attempt starts: a
    :class:`StoreUnavailableError` there hands the delivery back (see the module docstring)."""
    try:
        yield
    except StoreUnavailableError as exc:
        _hand_back(task, args, kwargs, exc)


@contextmanager
def rejected_if_unrecorded(task: Task) -> Iterator[None]:
    """Around a delivery's attempt and the writes of its outcome: a
    :class:`StoreUnavailableError` that escapes them rejects a late-acknowledged message with
    requeue (see the module docstring)."""
    try:
        yield
    except StoreUnavailableError as exc:
        request = task.request
        if request.is_eager or not task.acks_late:
            raise
        logger.error(
            "%s: the run's outcome could not be written within the backend's retry policy "
            "(%s); its message goes back to the broker, to continue the run",
            request.id,
            exc,
        )
        raise Reject(exc, requeue=True) from exc


def _hand_back(
    task: Task, args: tuple[Any, ...], kwargs: dict[str, Any], exc: StoreUnavailableError
) -> NoReturn:
    request = task.request
    if request.is_eager:
        raise exc
    retries = int(request.retries or 0)
    logger.warning(
        "%s: the result store stayed unreachable (%s); handing the delivery back to the "
        "broker, to run again in %g s as the same attempt",
        request.id,
        exc,
        REQUEUE_COUNTDOWN_SECONDS,
    )
    copy = task.signature_from_request(
        request, args, kwargs, countdown=REQUEUE_COUNTDOWN_SECONDS, retries=retries
    )
    try:
        # Celery's own apply_async: the engine's would look the result up in the unreachable
        # store first.
        CeleryTask.apply_async(task, copy.args, copy.kwargs, **copy.options)
    except Exception as publish_error:
        if task.acks_late:
            raise Reject(publish_error, requeue=True) from exc
        logger.error(
            "%s: the broker did not take the delivery back either (%s)", request.id, publish_error
        )
        raise exc from publish_error
    raise Ignore()
