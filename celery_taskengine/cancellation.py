"""Revoking an engine task ends its run ``Cancelled``.

Celery handles a revoke in the worker's main process: a queued message, or one waiting on the
worker's timer for its retry countdown, is discarded when it comes up; with ``terminate=True``
a running prefork child is killed. Either way Celery sends ``task-revoked``, stores REVOKED and
fires the ``task_revoked`` signal there, with the request; the handler below adds the
Cancelled state to the run record, so the run's history says how it ended.

Between two attempts of one delivery (immediate retries) the engine asks
:func:`revocation_check`, which reads the worker's revoked set. That set lives in the process
that received the revoke: the solo and threads pools see it; a prefork child sees only what was
revoked before it forked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.signals import task_revoked
from celery.worker import state as worker_state

from celery_taskengine.drivers import drive_sync
from celery_taskengine.parameters import bind_parameters
from celery_taskengine.result_store import store_for_app
from celery_taskengine.run_core import RunCore, RunEnvironment
from celery_taskengine.states import State, StateType, is_legal_transition

__all__ = ["record_cancelled", "revocation_check"]

logger = logging.getLogger(__name__)


def revocation_check(task_id: str) -> Callable[[], bool]:
    """The engine's ``is_cancelled`` for a delivery: has ``task_id`` been revoked here?"""
    revoked = worker_state.revoked

    def is_cancelled() -> bool:
        return task_id in revoked

    return is_cancelled


def record_cancelled(task: Any, request: Any, message: str) -> bool:
    """Enter Cancelled in the run record of ``request.id``; ``False`` if the run is over.

    A run that never started (revoked while queued) gets a record of its own: Pending,
    Cancelled. Transitions are the engine's: the core enters the states.
    """
    from celery_taskengine.task_engine import new_task_run

    task_id = str(request.id)
    store = store_for_app(task.app)
    run = store.load_run(task_id)
    if run is None:
        run = new_task_run(task, _parameters(task, request), task_id)
    cancelled = State(StateType.CANCELLED, "Cancelled", message)
    if run.state is not None and not is_legal_transition(run.state, cancelled):
        return False
    core = RunCore(task, run, RunEnvironment(store=store, record=None))
    drive_sync(core.initialize_run())
    drive_sync(core.set_state(cancelled))
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
    _on_task_revoked, weak=False, dispatch_uid="celery_taskengine.cancellation.task_revoked"
)


def _parameters(task: Any, request: Any) -> dict[str, Any]:
    try:
        return bind_parameters(task.run, tuple(request.args or ()), dict(request.kwargs or {}))
    except TypeError:
        return {}
