"""The reference engine's step-by-step methods, written once and given to both engines.

Prefect's task engines expose the run's stages as methods (``begin_run``, ``handle_retry``,
``transaction_context``, ...). Each is a core routine here, in one table; the sync engine
drives it blocking and the async engine with ``await``, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from celery_taskengine._engine.drivers import drive_async, drive_sync
from celery_taskengine._engine.steps import Steps

if TYPE_CHECKING:
    from celery_taskengine.task_engine import BaseTaskRunEngine
    from celery_taskengine.transactions import Transaction

__all__ = ["CONTEXTS", "METHODS", "add_methods"]

Routine = Callable[..., Steps[Any]]


def _initialize(
    engine: BaseTaskRunEngine, task_run_id: Any = None, dependencies: Any = None
) -> Steps[Any]:
    yield from engine.core.initialize_run()
    return engine


def _start(
    engine: BaseTaskRunEngine, task_run_id: Any = None, dependencies: Any = None
) -> Steps[None]:
    engine._started = True
    yield from engine.core.start()


def _nothing(engine: BaseTaskRunEngine, *args: Any) -> Steps[None]:
    return
    yield


def _call_task_fn(engine: BaseTaskRunEngine, transaction: Transaction) -> Steps[Any]:
    result = yield from engine.core.call_task_fn()
    yield from engine.core.handle_success(result, transaction)
    return result


def _handle_success(engine: BaseTaskRunEngine, result: Any, transaction: Transaction) -> Steps[Any]:
    yield from engine.core.handle_success(result, transaction)
    return result


def _leave_transaction(
    engine: BaseTaskRunEngine, txn: Transaction, error: BaseException | None
) -> Steps[None]:
    yield from txn.exit_steps(error)


#: Plain methods: ``name -> routine(engine, *args)``.
METHODS: dict[str, Routine] = {
    "begin_run": lambda e: e.core.begin_run(),
    "wait_until_ready": lambda e: e.core.wait_until_ready(),
    "call_task_fn": _call_task_fn,
    "handle_success": _handle_success,
    "handle_retry": lambda e, exc_or_state: e.core.handle_retry(exc_or_state),
    "can_retry": lambda e, exc_or_state: e.core.can_retry(exc_or_state),
    "handle_exception": lambda e, exc: e.core.handle_exception(exc),
    "handle_timeout": lambda e, exc: e.core.handle_timeout(exc),
    "handle_crash": lambda e, exc: e.core.handle_crash(exc),
    "call_hooks": lambda e, state=None: e.core.call_hooks(state or e.state),
    "set_state": lambda e, state, force=False: e.core.set_state(state),
}

#: Context managers: ``name -> (routine on entering, giving the value; routine on leaving,
#: given that value and the error; whether the run's scope is held open inside)``.
CONTEXTS: dict[str, tuple[Routine, Routine | None, bool]] = {
    "initialize_run": (_initialize, None, False),
    "start": (_start, None, False),
    "setup_run_context": (_nothing, None, True),
    "run_context": (_nothing, None, True),
    "asset_context": (_nothing, None, False),
    "transaction_context": (lambda e: e.core.transaction_context(), _leave_transaction, False),
}


def _blocking(routine: Routine) -> Callable[..., Any]:
    def method(self: BaseTaskRunEngine, *args: Any, **kwargs: Any) -> Any:
        return drive_sync(routine(self, *args, **kwargs), self.core.env)

    return method


def _awaiting(routine: Routine) -> Callable[..., Any]:
    async def method(self: BaseTaskRunEngine, *args: Any, **kwargs: Any) -> Any:
        return await drive_async(routine(self, *args, **kwargs), self.core.env)

    return method


def _blocking_context(enter: Routine, leave: Routine | None, scoped: bool) -> Callable[..., Any]:
    @contextmanager
    def method(self: BaseTaskRunEngine, *args: Any, **kwargs: Any) -> Iterator[Any]:
        env = self.core.env
        value = drive_sync(enter(self, *args, **kwargs), env)
        with self.core._scope() if scoped else nullcontext():
            try:
                yield value
            except BaseException as exc:
                if leave is not None:
                    drive_sync(leave(self, value, exc), env)
                raise
        if leave is not None:
            drive_sync(leave(self, value, None), env)

    return method


def _awaiting_context(enter: Routine, leave: Routine | None, scoped: bool) -> Callable[..., Any]:
    @asynccontextmanager
    async def method(self: BaseTaskRunEngine, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        env = self.core.env
        value = await drive_async(enter(self, *args, **kwargs), env)
        with self.core._scope() if scoped else nullcontext():
            try:
                yield value
            except BaseException as exc:
                if leave is not None:
                    await drive_async(leave(self, value, exc), env)
                raise
        if leave is not None:
            await drive_async(leave(self, value, None), env)

    return method


def add_methods(sync_engine: type, async_engine: type) -> None:
    """Give both engine classes every method of :data:`METHODS` and :data:`CONTEXTS`."""
    for name, routine in METHODS.items():
        for engine, make in ((sync_engine, _blocking), (async_engine, _awaiting)):
            method = make(routine)
            method.__name__ = method.__qualname__ = name
            setattr(engine, name, method)
    for name, (enter, leave, scoped) in CONTEXTS.items():
        for engine, make_context in (
            (sync_engine, _blocking_context),
            (async_engine, _awaiting_context),
        ):
            method = make_context(enter, leave, scoped)
            method.__name__ = method.__qualname__ = name
            setattr(engine, name, method)
