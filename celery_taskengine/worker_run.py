"""The worker side of the bridge: one Celery delivery runs the engine for that run."""

from __future__ import annotations

from typing import Any

from celery_taskengine.parameters import bind_parameters
from celery_taskengine.task_engine import run_task

__all__ = ["run_delivery"]


def run_delivery(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run the engine for the delivery Celery is executing (task id = run id)."""
    request = task.request
    parameters = bind_parameters(task.run, args, kwargs)
    return run_task(task, task_run_id=request.id, parameters=parameters)
