"""Reading run records back: ``get_task_run(id)`` from any process."""

from __future__ import annotations

from celery import Celery, current_app

from celery_taskengine._store.local_records import flush_run_records
from celery_taskengine._store.memory import default_memory_store
from celery_taskengine._store.selection import store_for_app
from celery_taskengine.task_run import TaskRun

__all__ = ["flush_run_records", "get_task_run"]


def get_task_run(task_id: object, app: Celery | None = None) -> TaskRun | None:
    """The run record for ``task_id`` (a Celery task id or a local run id); ``None`` if unknown.

    Looks in this process's memory first, where local runs live while they run (and copies of
    them are written to the backend in the background), then in the app's result backend
    (default: the current app), where worker runs and other processes' runs are.
    """
    run_id = str(task_id)
    run = default_memory_store().load_run(run_id)
    if run is not None:
        return run
    target = app if app is not None else current_app._get_current_object()
    return store_for_app(target).load_run(run_id)
