"""Reading run records back: ``get_task_run(id)`` from any process."""

from __future__ import annotations

import time

from celery import Celery, current_app

from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._store import local_records
from celery_taskengine._store.local_flush import FlushResult
from celery_taskengine._store.memory import default_memory_store
from celery_taskengine._store.selection import store_for_app
from celery_taskengine._store.write_behind import WriteBehindRecorder, flush_write_behind

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


def flush_run_records(app: Celery | None = None, timeout: float = 5.0) -> FlushResult:
    """Write this process's held local run records now and wait until the store has them.

    Other processes see a local run's record soon after it changes (within the flusher's
    interval, a few milliseconds); call this before handing a run id to another process that
    must see it at once. With ``app``, only that app's store is waited for. The result is false
    when a record since the last call was not written within ``timeout`` seconds or was refused;
    its ``lost_runs`` names those runs (each also logged with its run id).
    """
    deadline = time.monotonic() + timeout
    store = store_for_app(app) if app is not None else None
    written = local_records.flush_local_records(store, timeout)
    recorders = None
    if store is not None:
        recorder = store.local_recorder()
        recorders = [recorder] if isinstance(recorder, WriteBehindRecorder) else []
    _, behind_lost = flush_write_behind(recorders, max(0.0, deadline - time.monotonic()))
    return FlushResult.combine([written, FlushResult(tuple(behind_lost), len(behind_lost))])
