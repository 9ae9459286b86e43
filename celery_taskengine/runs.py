"""Reading run records back: ``get_task_run(id)`` from any process."""

from __future__ import annotations

from celery import Celery, current_app

from celery_taskengine.memory_store import default_memory_store
from celery_taskengine.result_store import store_for_app
from celery_taskengine.task_run import TaskRun

__all__ = ["get_task_run"]


def get_task_run(task_id: object, app: Celery | None = None) -> TaskRun | None:
    """The run record for ``task_id`` (a Celery task id or a local run id); ``None`` if unknown.

    Looks in the app's result backend (default: the current app), then in this process's
    memory, where local runs without a backend are kept.
    """
    run_id = str(task_id)
    target = app if app is not None else current_app._get_current_object()
    run = store_for_app(target).load_run(run_id)
    if run is None:
        run = default_memory_store().load_run(run_id)
    return run
