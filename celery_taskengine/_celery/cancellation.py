"""Revoking an engine task ends its run ``Cancelled``.

Celery handles a revoke in the worker's main process: a queued message, or one waiting on the
worker's timer for its retry countdown, is discarded when it comes up; with ``terminate=True``
a running prefork child is killed. Either way Celery sends ``task-revoked``, stores REVOKED and
fires the ``task_revoked`` signal there, with the request; the handler below adds the
Cancelled state to the run record, so the run's history says how it ended.

Between two attempts of one delivery (immediate retries) the engine asks
:func:`revocation_check`, which reads the worker's revoked set. That set lives in the process
that received the revoke, so for a running engine task the main process also leaves a marker
in the app's store (expiring with run records), which a prefork child
reads before its second and later attempts (the first needs no look: Celery checks the
revoked set before it hands a message to a child).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from celery.signals import task_revoked, worker_init
from celery.utils.functional import maybe_list
from celery.worker import control
from celery.worker import state as worker_state

from celery_taskengine._engine.drivers import drive_sync
from celery_taskengine._engine.parameters import bind_parameters
from celery_taskengine._engine.run_core import RunCore, RunEnvironment
from celery_taskengine._store.protocol import ResultStore
from celery_taskengine._store.selection import store_for_app
from celery_taskengine.states import State, StateType, is_legal_transition

__all__ = ["record_cancelled", "revocation_check"]

logger = logging.getLogger(__name__)


#: The pid of the worker's main process (set at ``worker_init``); pool children differ.
_worker_pid: int | None = None


def revocation_check(task_id: str, store: ResultStore | None = None) -> Callable[[], bool]:
    """The engine's ``is_cancelled`` for a delivery: has ``task_id`` been revoked?"""
    revoked = worker_state.revoked
    if store is None or not store.shared or _worker_pid in (None, os.getpid()):

        def is_cancelled() -> bool:
            return task_id in revoked

        return is_cancelled

    shared_store = store
    asked = [False]

    def is_cancelled_in_child() -> bool:
        if task_id in revoked:
            return True
        if not asked[0]:  # before the first attempt: Celery has just checked
            asked[0] = True
            return False
        return shared_store.is_revoked(task_id)

    return is_cancelled_in_child


def _revoke_and_tell_children(state: Any, task_id: Any, *args: Any, **kwargs: Any) -> Any:
    """Celery's ``revoke`` control command, plus a marker for engine tasks running here."""
    reply = _celery_revoke(state, task_id, *args, **kwargs)
    ids = set(maybe_list(task_id) or [])
    for request in list(worker_state.active_requests):
        task: Any = getattr(request, "task", None)
        if request.id not in ids or getattr(task, "engine_options", None) is None:
            continue
        try:
            store = store_for_app(task.app)
            if store.shared:
                store.mark_revoked(str(request.id))
        except Exception:
            logger.warning("%s: could not tell the running attempt", request.id, exc_info=True)
    return reply


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    global _worker_pid
    _worker_pid = os.getpid()
    if control.Panel.data.get("revoke") is _celery_revoke:
        control.Panel.data["revoke"] = _revoke_and_tell_children


_celery_revoke = control.Panel.data["revoke"]
worker_init.connect(
    _on_worker_init, weak=False, dispatch_uid="celery_taskengine._celery.cancellation.worker_init"
)


def record_cancelled(task: Any, request: Any, message: str) -> bool:
    """Enter Cancelled in the run record of ``request.id``; ``False`` if the run is over.

    A run that never started (revoked while queued) gets a record of its own: Pending,
    Cancelled. Transitions are the engine's: the core enters the states.
    """
    from celery_taskengine._engine.task_run import new_task_run

    task_id = str(request.id)
    store = store_for_app(task.app)
    run = store.load_run(task_id)
    if run is None:
        run = new_task_run(task, _parameters(task, request), task_id)
    cancelled = State(StateType.CANCELLED, "Cancelled", message)
    if run.state is not None and not is_legal_transition(run.state, cancelled):
        return False
    core = RunCore(task, run, RunEnvironment(store=store))
    drive_sync(core.initialize_run(), core.env)
    drive_sync(core.set_state(cancelled), core.env)
    store.save_run(run)
    logger.info("%s: cancelled: %s", task_id, message)
    return True


def _on_task_revoked(
    sender: Any = None,
    request: Any = None,
    terminated: bool = False,
    signum: Any = None,
    expired: bool = False,
    **_: Any,
) -> None:
    if getattr(sender, "engine_options", None) is None or request is None:
        return  # not an engine task
    if expired:
        message = "The task run expired before it could start."
    elif terminated:
        message = f"The task run was terminated (signal {signum})."
    else:
        message = "The task run was revoked."
    try:
        record_cancelled(sender, request, message)
    except Exception:
        logger.warning("%s: could not record the cancellation", request.id, exc_info=True)


task_revoked.connect(
    _on_task_revoked, weak=False, dispatch_uid="celery_taskengine._celery.cancellation.task_revoked"
)


def _parameters(task: Any, request: Any) -> dict[str, Any]:
    try:
        return bind_parameters(task.run, tuple(request.args or ()), dict(request.kwargs or {}))
    except TypeError:
        return {}
