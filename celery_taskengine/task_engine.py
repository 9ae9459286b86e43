"""The engine's public face: ``run_task*`` and the sync/async engine shells.

Both engine classes hold one :class:`~celery_taskengine._engine.run_core.RunCore` and only
carry out its steps, blocking or with ``await``; the method names follow Prefect's task engine.
"""

from __future__ import annotations

import threading
from collections.abc import (
    AsyncGenerator,
    Callable,
    Coroutine,
    Generator,
)
from contextlib import suppress
from typing import Any, Literal

from celery_taskengine._engine.drivers import (
    Finished,
    drive_async,
    drive_sync,
    iterate_async,
    iterate_sync,
)
from celery_taskengine._engine.engine_methods import add_methods
from celery_taskengine._engine.observers import RunObservers, local_observer
from celery_taskengine._engine.run_core import EngineTask, RunCore, RunEnvironment
from celery_taskengine._engine.task_run import TaskRun, new_run_id, new_task_run
from celery_taskengine._store.protocol import ResultStore
from celery_taskengine._store.selection import store_for_app
from celery_taskengine.errors import TaskRunTimeoutError
from celery_taskengine.states import State, StateType
from celery_taskengine.transactions import Transaction

__all__ = [
    "AsyncTaskRunEngine",
    "BaseTaskRunEngine",
    "SyncTaskRunEngine",
    "TaskRunTimeoutError",
    "new_run_id",
    "new_task_run",
    "run_generator_task_async",
    "run_generator_task_sync",
    "run_task",
    "run_task_async",
    "run_task_sync",
    "runner_for",
]

ReturnType = Literal["state", "result"]


def local_environment(task: EngineTask, context: dict[str, Any] | None) -> RunEnvironment:
    """Where a run executes when nothing else says: this process, the app's store."""
    if context:
        given = context.get("environment")
        if isinstance(given, RunEnvironment):
            return given
        cancel_event = context.get("cancel_event")
        if isinstance(cancel_event, threading.Event):
            env = _fresh_local_environment(task)
            env.is_cancelled = cancel_event.is_set
            return env
    # Local runs of one task share one environment: it holds configuration, not run state.
    shared: RunEnvironment | None = getattr(task, "_local_environment", None)
    if shared is None:
        shared = _fresh_local_environment(task)
        with suppress(AttributeError):
            task._local_environment = shared  # type: ignore[attr-defined]
    return shared


def _fresh_local_environment(task: EngineTask) -> RunEnvironment:
    store: ResultStore = store_for_app(getattr(task, "app", None))
    return RunEnvironment(store=store, observers=RunObservers([local_observer(store)]))


class BaseTaskRunEngine:
    """What both engines share: the run, its core, and the answers that need no I/O."""

    def __init__(
        self,
        task: EngineTask,
        parameters: dict[str, Any] | None = None,
        task_run: TaskRun | None = None,
        wait_for: Any = None,
        context: dict[str, Any] | None = None,
        task_run_id: Any = None,
        *,
        is_async: bool = False,
        is_generator: bool = False,
    ) -> None:
        self.task = task
        self.context = context or {}
        self.task_run = task_run or new_task_run(task, dict(parameters or {}), task_run_id)
        self.parameters = self.task_run.parameters
        if wait_for is not None and not isinstance(wait_for, list | tuple | set):
            wait_for = [wait_for]
        self.wait_for = wait_for
        self.core = RunCore(
            task,
            self.task_run,
            local_environment(task, context),
            wait_for=wait_for,
            is_async=is_async,
            is_generator=is_generator,
        )
        self._started = False

    @property
    def state(self) -> State:
        return self.core.state

    @property
    def retries(self) -> int:
        """Retries used so far."""
        return max(0, self.task_run.run_count - 1)

    def is_running(self) -> bool:
        """Whether the run is executing (Running or Retrying)."""
        return self.task_run.state is not None and self.task_run.state.is_running()

    def is_cancelled(self) -> bool:
        check = self.core.env.is_cancelled
        return bool(check()) if check is not None else False

    def compute_transaction_key(self) -> str | None:
        return drive_sync(self.core.compute_transaction_key(), self.core.env)

    def handle_rollback(self, txn: Transaction) -> None:
        """Roll ``txn`` back (blocking), running its rollback hooks."""
        txn.rollback()

    def log_finished_message(self) -> None:
        self.core.log_finished_message()

    def record_terminal_state_timing(self, state: State) -> None:
        """Set the run's end time from a final ``state`` (set_state already does this)."""
        if state.is_final():
            self.task_run.end_time = state.timestamp

    def result(self, raise_on_failure: bool = True) -> Any:
        """The value, or raise the stored exception; ``None`` when the run did not execute."""
        state = self.state
        if state.is_completed():
            return state.data
        if state.type in (StateType.PENDING, StateType.SCHEDULED, StateType.RUNNING):
            return None
        return state.result(raise_on_failure=raise_on_failure)

    def _answer(self, return_type: ReturnType) -> Any:
        state = self.task_run.state  # set: the run was driven
        if return_type == "state":
            return state
        if state is not None and state.type is StateType.COMPLETED:
            return state.data  # result()'s first case, the common one, without its calls
        return self.result()


class SyncTaskRunEngine(BaseTaskRunEngine):
    """Runs a task in the calling thread, blocking (retry delays sleep here)."""

    def run(self) -> State:
        """The whole run, to a final state."""
        self._started = True
        return drive_sync(self.core.run_to_end(), self.core.env)

    @property
    def client(self) -> ResultStore:
        if not self._started:
            raise RuntimeError("Engine has not started.")
        return self.core.env.store


class AsyncTaskRunEngine(BaseTaskRunEngine):
    """Runs a task on the running event loop (retry delays ``await``)."""

    async def run(self) -> State:
        """The whole run, to a final state."""
        self._started = True
        return await drive_async(self.core.run_to_end(), self.core.env)

    @property
    def client(self) -> ResultStore:
        if not self._started:
            raise RuntimeError("Engine has not started.")
        return self.core.env.store


add_methods(SyncTaskRunEngine, AsyncTaskRunEngine)


def run_task_sync(
    task: Any,
    task_run_id: Any = None,
    task_run: TaskRun | None = None,
    parameters: dict[str, Any] | None = None,
    wait_for: Any = None,
    return_type: ReturnType = "result",
    dependencies: dict[str, set[Any]] | None = None,
    context: dict[str, Any] | None = None,
) -> Any:
    """Run a sync task to a final state here; return its value (or final State)."""
    engine = SyncTaskRunEngine(task, parameters, task_run, wait_for, context, task_run_id)
    engine._started = True
    drive_sync(engine.core.run_to_end(), engine.core.env)  # engine.run(), one call less
    return engine._answer(return_type)


async def run_task_async(
    task: Any,
    task_run_id: Any = None,
    task_run: TaskRun | None = None,
    parameters: dict[str, Any] | None = None,
    wait_for: Any = None,
    return_type: ReturnType = "result",
    dependencies: dict[str, set[Any]] | None = None,
    context: dict[str, Any] | None = None,
) -> Any:
    """Run an async task to a final state on the running loop; return its value or State."""
    engine = AsyncTaskRunEngine(
        task, parameters, task_run, wait_for, context, task_run_id, is_async=True
    )
    engine._started = True
    await drive_async(engine.core.run_to_end(), engine.core.env)  # engine.run(), one less
    return engine._answer(return_type)


def run_generator_task_sync(
    task: Any,
    task_run_id: Any = None,
    task_run: TaskRun | None = None,
    parameters: dict[str, Any] | None = None,
    wait_for: Any = None,
    return_type: ReturnType = "result",
    dependencies: dict[str, set[Any]] | None = None,
    context: dict[str, Any] | None = None,
) -> Generator[Any, None, Any]:
    """Run a generator task, yielding each item as the task yields it.

    The task's ``return`` value comes back as ``StopIteration.value``; a failure is raised
    after the items yielded so far.
    """
    if return_type != "result":
        raise ValueError("The return_type for a generator task must be 'result'")
    engine = SyncTaskRunEngine(
        task, parameters, task_run, wait_for, context, task_run_id, is_generator=True
    )
    engine._started = True
    items = iterate_sync(engine.core.run_to_end(), engine.core.env)
    try:
        for item in items:
            if isinstance(item, Finished):
                break
            yield item
    finally:
        # An early close() must reach the core now, so it can finish the run (hooks).
        items.close()
    return engine.result()


async def run_generator_task_async(
    task: Any,
    task_run_id: Any = None,
    task_run: TaskRun | None = None,
    parameters: dict[str, Any] | None = None,
    wait_for: Any = None,
    return_type: ReturnType = "result",
    dependencies: dict[str, set[Any]] | None = None,
    context: dict[str, Any] | None = None,
) -> AsyncGenerator[Any, None]:
    """Run an async generator task, yielding each item; raise a failure at the end."""
    if return_type != "result":
        raise ValueError("The return_type for a generator task must be 'result'")
    engine = AsyncTaskRunEngine(
        task,
        parameters,
        task_run,
        wait_for,
        context,
        task_run_id,
        is_async=True,
        is_generator=True,
    )
    engine._started = True
    items = iterate_async(engine.core.run_to_end(), engine.core.env)
    try:
        async for item in items:
            if isinstance(item, Finished):
                break
            yield item
    finally:
        # An early aclose() must reach the core now, in this task's context; left to the
        # loop's async-generator finalizer the run would never finish (and hooks never run).
        await items.aclose()
    engine.result()


def run_task(
    task: Any,
    task_run_id: Any = None,
    task_run: TaskRun | None = None,
    parameters: dict[str, Any] | None = None,
    wait_for: Any = None,
    return_type: ReturnType = "result",
    dependencies: dict[str, set[Any]] | None = None,
    context: dict[str, Any] | None = None,
) -> Any | Coroutine[Any, Any, Any]:
    """Run ``task`` with the runner its function needs.

    Async generators and generators give iterators, ``async def`` a coroutine to await, and
    plain functions their value (or final State) right away.
    """
    runner = runner_for(task.fn_kind)
    return runner(
        task, task_run_id, task_run, parameters, wait_for, return_type, dependencies, context
    )


_RUNNERS: dict[str, Callable[..., Any]] = {
    "function": run_task_sync,
    "coroutine": run_task_async,
    "generator": run_generator_task_sync,
    "async_generator": run_generator_task_async,
}
#: The runner for a function of ``kind`` (``Task.fn_kind``): the one sync/async/generator
#: dispatch, for ``Task.__call__``, :func:`run_task` and the worker alike. A dict lookup, since
#: it is on every call's path.
runner_for: Callable[[str], Callable[..., Any]] = _RUNNERS.__getitem__
