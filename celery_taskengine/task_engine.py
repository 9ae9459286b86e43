"""The engine's public face: ``run_task*`` and the sync/async engine shells.

Both engine classes hold one :class:`~celery_taskengine.run_core.RunCore` and only carry out its
steps, blocking or with ``await``; the method names follow Prefect's task engine.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Generator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any, Literal

from celery_taskengine._store.protocol import ResultStore
from celery_taskengine._store.selection import store_for_app
from celery_taskengine.drivers import Finished, drive_async, drive_sync, iterate_async, iterate_sync
from celery_taskengine.errors import TaskRunTimeoutError
from celery_taskengine.run_core import EngineTask, RunCore, RunEnvironment
from celery_taskengine.states import State, StateType
from celery_taskengine.task_run import TaskRun
from celery_taskengine.transactions import Transaction

__all__ = [
    "AsyncTaskRunEngine",
    "BaseTaskRunEngine",
    "SyncTaskRunEngine",
    "TaskRunTimeoutError",
    "run_generator_task_async",
    "run_generator_task_sync",
    "run_task",
    "run_task_async",
    "run_task_sync",
]

ReturnType = Literal["state", "result"]


_id_source = random.Random()
os.register_at_fork(after_in_child=_id_source.seed)


def new_run_id() -> str:
    """A random UUID4 string, like Celery's task ids.

    Drawn from a per-process generator (reseeded after fork) rather than ``uuid.uuid4()``,
    whose system call is a tenth of a local run's whole cost.
    """
    n = _id_source.getrandbits(128)
    n = (n & ~(0xC000 << 48)) | (0x8000 << 48)  # RFC 4122 variant
    n = (n & ~(0xF000 << 64)) | (4 << 76)  # version 4
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_task_run(task: EngineTask, parameters: dict[str, Any], task_run_id: Any = None) -> TaskRun:
    """A fresh run record for ``task`` (no state yet; the engine enters Pending)."""
    return TaskRun(
        id=str(task_run_id) if task_run_id is not None else new_run_id(),
        name=task.engine_options.name,
        task_name=task.name,
        parameters=parameters,
        tags=task.engine_options.tags,
    )


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
    recorder = store.local_recorder()
    # Without a recorder the store keeps the live TaskRun object: saving it once is enough.
    return RunEnvironment(store=store, record=recorder, saves_on_create=recorder is None)


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
        return self.core.compute_transaction_key()

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
        return self.state if return_type == "state" else self.result()


class SyncTaskRunEngine(BaseTaskRunEngine):
    """Runs a task in the calling thread, blocking (retry delays sleep here)."""

    def run(self) -> State:
        """The whole run, to a final state."""
        self._started = True
        return drive_sync(self.core.run_to_end())

    @property
    def client(self) -> ResultStore:
        if not self._started:
            raise RuntimeError("Engine has not started.")
        return self.core.env.store

    @contextmanager
    def initialize_run(
        self, task_run_id: Any = None, dependencies: Any = None
    ) -> Iterator[SyncTaskRunEngine]:
        drive_sync(self.core.initialize_run())
        yield self

    @contextmanager
    def start(self, task_run_id: Any = None, dependencies: Any = None) -> Iterator[None]:
        self._started = True
        drive_sync(self.core.start())
        yield

    @contextmanager
    def setup_run_context(self, client: Any = None) -> Iterator[None]:
        with self.core._scope():
            yield

    @contextmanager
    def run_context(self) -> Iterator[None]:
        with self.core._scope():
            yield

    @contextmanager
    def asset_context(self) -> Iterator[None]:
        yield

    @contextmanager
    def transaction_context(self) -> Iterator[Transaction]:
        txn = self.core.transaction_context()
        drive_sync(txn.begin_steps())
        try:
            yield txn
        except BaseException as exc:
            drive_sync(txn.exit_steps(exc))
            raise
        drive_sync(txn.exit_steps(None))

    def begin_run(self) -> None:
        drive_sync(self.core.begin_run())

    def wait_until_ready(self) -> None:
        drive_sync(self.core.wait_until_ready())

    def call_task_fn(self, transaction: Transaction) -> Any:
        result = drive_sync(self.core.call_task_fn())
        drive_sync(self.core.handle_success(result, transaction))
        return result

    def handle_success(self, result: Any, transaction: Transaction) -> Any:
        drive_sync(self.core.handle_success(result, transaction))
        return result

    def handle_retry(self, exc_or_state: BaseException | State) -> bool:
        return drive_sync(self.core.handle_retry(exc_or_state))

    def can_retry(self, exc_or_state: BaseException | State) -> bool:
        return drive_sync(self.core.can_retry(exc_or_state))

    def handle_exception(self, exc: Exception) -> None:
        drive_sync(self.core.handle_exception(exc))

    def handle_timeout(self, exc: TimeoutError) -> None:
        drive_sync(self.core.handle_timeout(exc))

    def handle_crash(self, exc: BaseException) -> None:
        drive_sync(self.core.handle_crash(exc))

    def call_hooks(self, state: State | None = None) -> None:
        drive_sync(self.core.call_hooks(state or self.state))

    def set_state(self, state: State, force: bool = False) -> State:
        return drive_sync(self.core.set_state(state))


class AsyncTaskRunEngine(BaseTaskRunEngine):
    """Runs a task on the running event loop (retry delays ``await``)."""

    async def run(self) -> State:
        """The whole run, to a final state."""
        self._started = True
        return await drive_async(self.core.run_to_end())

    @property
    def client(self) -> ResultStore:
        if not self._started:
            raise RuntimeError("Engine has not started.")
        return self.core.env.store

    @asynccontextmanager
    async def initialize_run(
        self, task_run_id: Any = None, dependencies: Any = None
    ) -> AsyncIterator[AsyncTaskRunEngine]:
        await drive_async(self.core.initialize_run())
        yield self

    @asynccontextmanager
    async def start(self, task_run_id: Any = None, dependencies: Any = None) -> AsyncIterator[None]:
        self._started = True
        await drive_async(self.core.start())
        yield

    @asynccontextmanager
    async def setup_run_context(self, client: Any = None) -> AsyncIterator[None]:
        with self.core._scope():
            yield

    @asynccontextmanager
    async def run_context(self) -> AsyncIterator[None]:
        with self.core._scope():
            yield

    @asynccontextmanager
    async def asset_context(self) -> AsyncIterator[None]:
        yield

    @asynccontextmanager
    async def transaction_context(self) -> AsyncIterator[Transaction]:
        txn = self.core.transaction_context()
        await drive_async(txn.begin_steps())
        try:
            yield txn
        except BaseException as exc:
            await drive_async(txn.exit_steps(exc))
            raise
        await drive_async(txn.exit_steps(None))

    async def begin_run(self) -> None:
        await drive_async(self.core.begin_run())

    async def wait_until_ready(self) -> None:
        await drive_async(self.core.wait_until_ready())

    async def call_task_fn(self, transaction: Transaction) -> Any:
        result = await drive_async(self.core.call_task_fn())
        await drive_async(self.core.handle_success(result, transaction))
        return result

    async def handle_success(self, result: Any, transaction: Transaction) -> Any:
        await drive_async(self.core.handle_success(result, transaction))
        return result

    async def handle_retry(self, exc_or_state: BaseException | State) -> bool:
        return await drive_async(self.core.handle_retry(exc_or_state))

    async def can_retry(self, exc_or_state: BaseException | State) -> bool:
        return await drive_async(self.core.can_retry(exc_or_state))

    async def handle_exception(self, exc: Exception) -> None:
        await drive_async(self.core.handle_exception(exc))

    async def handle_timeout(self, exc: TimeoutError) -> None:
        await drive_async(self.core.handle_timeout(exc))

    async def handle_crash(self, exc: BaseException) -> None:
        await drive_async(self.core.handle_crash(exc))

    async def call_hooks(self, state: State | None = None) -> None:
        await drive_async(self.core.call_hooks(state or self.state))

    async def set_state(self, state: State, force: bool = False) -> State:
        return await drive_async(self.core.set_state(state))


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
    engine.run()
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
    await engine.run()
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
    items = iterate_sync(engine.core.run_to_end())
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
    items = iterate_async(engine.core.run_to_end())
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
    kwargs: dict[str, Any] = {
        "task_run_id": task_run_id,
        "task_run": task_run,
        "parameters": parameters,
        "wait_for": wait_for,
        "return_type": return_type,
        "dependencies": dependencies,
        "context": context,
    }
    kind = task.fn_kind
    if kind == "async_generator":
        return run_generator_task_async(task, **kwargs)
    if kind == "generator":
        return run_generator_task_sync(task, **kwargs)
    if kind == "coroutine":
        return run_task_async(task, **kwargs)
    return run_task_sync(task, **kwargs)
