"""One task body as a ``def`` and as an ``async def``, run the matching way.

Shared by the engine tests through the ``flavour`` fixture (tests/conftest.py): where sync and
async runs must behave the same, one test body checks both.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery_taskengine import Task, get_task_run, task
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine.states import State
from celery_taskengine.task_engine import run_task_async, run_task_sync


def as_async(body: Callable[..., Any]) -> Callable[..., Any]:
    """``body`` as an ``async def`` with the same name and signature."""

    @functools.wraps(body)
    async def async_body(*args: Any, **kwargs: Any) -> Any:
        return body(*args, **kwargs)

    return async_body


@dataclass(frozen=True)
class Flavour:
    """Makes a task from a sync body as ``def`` or ``async def`` and runs it the matching way."""

    is_async: bool

    def task(
        self,
        body: Callable[..., Any],
        *,
        async_body: Callable[..., Any] | None = None,
        **options: Any,
    ) -> Task:
        if not self.is_async:
            return task(**options)(body)
        return task(**options)(async_body or as_async(body))

    def run(self, t: Task, parameters: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        if self.is_async:
            return asyncio.run(run_task_async(t, parameters=parameters, **kwargs))
        return run_task_sync(t, parameters=parameters, **kwargs)

    def run_state(
        self, t: Task, parameters: dict[str, Any] | None = None, **kwargs: Any
    ) -> tuple[State, TaskRun]:
        """The final state and the run record."""
        run_id = str(uuid.uuid4())
        state = self.run(t, parameters, return_type="state", task_run_id=run_id, **kwargs)
        run = get_task_run(run_id)
        assert run is not None
        return state, run
