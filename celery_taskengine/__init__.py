"""celery-taskengine: a Prefect-style task engine for existing Celery deployments."""

from __future__ import annotations

from celery_taskengine._celery.runs import flush_run_records, get_task_run
from celery_taskengine._celery.streaming import stream
from celery_taskengine._celery.task import Task, shared_task, task
from celery_taskengine._engine.retry_policy import exponential_backoff
from celery_taskengine._engine.run_scope import current_task_run
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine.errors import (
    CancelledRun,
    ConfigurationError,
    CrashedRun,
    FailedRun,
    ReservedArgumentError,
    TaskEngineError,
    TaskRunTimeoutError,
    UnfinishedRun,
)
from celery_taskengine.states import State, StateType
from celery_taskengine.transactions import transaction

__all__ = [
    "CancelledRun",
    "ConfigurationError",
    "CrashedRun",
    "FailedRun",
    "ReservedArgumentError",
    "State",
    "StateType",
    "Task",
    "TaskEngineError",
    "TaskRun",
    "TaskRunTimeoutError",
    "UnfinishedRun",
    "current_task_run",
    "exponential_backoff",
    "flush_run_records",
    "get_task_run",
    "shared_task",
    "stream",
    "task",
    "transaction",
]

__version__ = "0.1.0"
