"""The worker's request for engine tasks: AWAITING-RETRY stays visible for the whole wait.

A monitor (Flower, ``celery events``) folds task events into one state per task with
``celery.events.state.Task.event``: a state of lower precedence only merges its fields, except
that RETRY always wins and anything after RETRY wins. An engine retry with a delay sends
``task-awaiting-retry`` from the run, then Celery's main process sends ``task-retried`` (when
the pool hands back the :class:`~celery.exceptions.Retry`) and ``task-received`` for the
countdown copy, in either order, milliseconds later; so a monitor showed RETRY or RECEIVED for
the wait. Announcing AwaitingRetry again right after ``task-retried``, from the same process
and connection, makes it the state that holds: the copy's RECEIVED and, when the retry begins,
STARTED rank below it and only merge, until ``task-retrying`` (or a final state) replaces it.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from celery.worker.request import Request

__all__ = ["EngineRequest"]


class EngineRequest(Request):  # type: ignore[misc]
    """Celery's request, re-announcing AwaitingRetry after Celery's ``task-retried``."""

    def on_retry(self, exc_info: Any) -> None:
        super().on_retry(exc_info)
        # The attempt number comes from the message, as the run's does.
        attempt = int(self.request_dict.get("retries") or 0) + 1
        fields: dict[str, Any] = {"run_count": attempt, "retries": attempt - 1}
        retry = exc_info.exception
        if isinstance(retry, ExceptionWithTraceback):  # as the pool hands it back
            retry = retry.exc
        eta = _eta(getattr(retry, "when", None))
        if eta is not None:
            fields["eta"] = eta
        self.send_event("task-awaiting-retry", engine_state="AwaitingRetry", **fields)


def _eta(when: Any) -> str | None:
    """The retry's time (ISO 8601) from Celery's ``Retry.when``: a countdown or a datetime."""
    if isinstance(when, datetime):
        return when.isoformat()
    if isinstance(when, (int, float)):
        return (datetime.now(timezone.utc) + timedelta(seconds=when)).isoformat()
    return None
