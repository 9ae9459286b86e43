"""Engine states as Celery task events, so monitors (Flower, ``celery events``) see them.

Flower builds a task's state from events alone. States with a Celery twin are announced by
Celery itself when the worker sends task events (``-E``): Pending is ``task-received``, Running
``task-started``, Completed ``task-succeeded``, Failed ``task-failed`` and Cancelled
``task-revoked``. Every other state goes out as ``task-<kebab-name>`` (``task-awaiting-retry``,
``task-retrying``, ``task-cached``, ...), which a monitor shows as ``AWAITING-RETRY`` and so on.

Never sent: Celery's own ``task-retry``/``task-retried`` and ``task-success`` (a monitor would
take them for real retries or a finished task), nor a field named ``state`` or ``worker`` (they
break Flower's task pages). A state whose name would map to one of those is not announced.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from celery.signals import worker_init

from celery_taskengine._engine.observers import RunObserver, StateWrites
from celery_taskengine.states import State, StateType

if TYPE_CHECKING:
    from celery import Celery

    from celery_taskengine._engine.task_run import TaskRun

__all__ = [
    "StateEvents",
    "event_fields",
    "event_type",
    "send_state_event",
    "task_events_enabled",
]

logger = logging.getLogger(__name__)

#: Engine state names Celery announces itself; sending them again would be a duplicate.
CELERY_TWINS = frozenset({"Pending", "Running", "Completed", "Failed", "Cancelled"})
#: Event types that mean something else to Celery and its monitors.
RESERVED_TYPES = frozenset(
    {
        "task-sent",
        "task-received",
        "task-started",
        "task-succeeded",
        "task-failed",
        "task-rejected",
        "task-revoked",
        "task-retried",
        "task-retry",
        "task-success",
    }
)

_KEBAB = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|[^A-Za-z0-9]+")

#: Whether the worker in this process sends task events (``-E``); ``None`` outside a worker.
#: Set in the worker's main process before its pool forks, so children inherit it.
_worker_task_events: bool | None = None


def _remember_task_events(sender: Any = None, **_: Any) -> None:
    global _worker_task_events
    _worker_task_events = bool(getattr(sender, "task_events", False))


worker_init.connect(
    _remember_task_events, weak=False, dispatch_uid="celery_taskengine._celery.events.worker_init"
)


def task_events_enabled(app: Celery) -> bool:
    """Whether the worker running here announces task events (``-E`` or the setting)."""
    if _worker_task_events is not None:
        return _worker_task_events
    return bool(app.conf.worker_send_task_events)


def event_type(state: State) -> str | None:
    """The event announcing ``state``, or ``None`` when Celery announces it (or must not)."""
    if state.name in CELERY_TWINS:
        return None
    kind = "task-" + _KEBAB.sub("-", state.name).strip("-").lower()
    return None if kind in RESERVED_TYPES or kind == "task-" else kind


def event_fields(run: TaskRun, state: State) -> dict[str, Any]:
    """The fields of a state event: ``engine_state``, ``run_count`` and, for retries,
    Celery's standard ``retries`` (retries used so far) and ``eta`` (ISO 8601)."""
    fields: dict[str, Any] = {"engine_state": state.name, "run_count": run.run_count}
    if state.type is StateType.SCHEDULED or state.name == "Retrying":
        fields["retries"] = max(0, run.run_count - 1)
    if state.scheduled_time is not None:
        fields["eta"] = state.scheduled_time.isoformat()
    return fields


def send_state_event(
    app: Celery, hostname: str | None, task_id: str, run: TaskRun, state: State
) -> None:
    """Announce ``state`` of run ``task_id`` if it has no Celery twin (one broker publish).

    What ``Task.send_event`` does, without reading ``task.request``: async tasks record their
    states on the worker loop's thread, where Celery's request is not visible. A failure to
    publish is logged and never changes the run.
    """
    kind = event_type(state)
    if kind is None or not task_events_enabled(app):
        return
    try:
        with app.events.default_dispatcher(hostname=hostname) as dispatcher:
            dispatcher.send(
                kind,
                uuid=task_id,
                retry=True,
                retry_policy=app.conf.task_publish_retry_policy,
                **event_fields(run, state),
            )
    except Exception:
        logger.warning("%s: could not send the %s event", task_id, kind, exc_info=True)


class StateEvents(RunObserver):
    """Announces a worker run's states that Celery has no event for (see the module docstring).

    Sent even for a state whose writes were dropped (a lost claim): events are what happened.
    """

    writes_batch = False

    def __init__(self, app: Celery, hostname: str | None, task_id: str) -> None:
        self.app = app
        self.hostname = hostname
        self.task_id = task_id

    def on_state(self, run: TaskRun, state: State, batch: StateWrites) -> None:
        send_state_event(self.app, self.hostname, self.task_id, run, state)
