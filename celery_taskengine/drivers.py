"""The two drivers that carry out the core's steps: one blocking, one with ``await``.

The loops are deliberately the same twice, side by side, so a reader can see that they differ
only by ``await``; all decisions live in the core. A driver holds what the core must not touch:
the environment's store and observers (``Record`` steps), the cache reads sent ahead, and the
leases of SERIALIZABLE locks. Items a generator task yields come out of :func:`iterate_sync` /
:func:`iterate_async` as they are produced.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
import types
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Iterator
from typing import Any, Protocol, TypeVar

import anyio

from celery_taskengine import timeouts
from celery_taskengine.lock_lease import take_lock
from celery_taskengine.steps import (
    Advance,
    CallTask,
    CheckCancelled,
    CloseItems,
    ComputeKey,
    Emit,
    GeneratorClosed,
    ReadCache,
    Record,
    ReleaseLock,
    RunHook,
    Sleep,
    Step,
    Steps,
    TakeLock,
    WriteCache,
)

__all__ = [
    "Finished",
    "GeneratorClosed",
    "Outlet",
    "drive_async",
    "drive_sync",
    "iterate_async",
    "iterate_sync",
    "run_awaitable_sync",
]

T = TypeVar("T")


class Outlet(Protocol):
    """What a driver needs of the place a run executes (a ``RunEnvironment``)."""

    @property
    def store(self) -> Any: ...

    @property
    def record(self) -> Callable[..., None] | None: ...

    @property
    def saves_on_create(self) -> bool: ...


class Finished:
    """Wraps the core's return value as the last item of :func:`iterate_async`."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _Drive:
    """One drive's own state: its outlet and the cache read it sent ahead, if any."""

    __slots__ = ("ahead", "outlet")

    def __init__(self, outlet: Outlet | None) -> None:
        self.outlet = outlet
        #: ``(key, pending read or None)`` from a ``ReadCache(ahead=True)``.
        self.ahead: tuple[str, Any] | None = None

    def close(self) -> None:
        """Give back a read sent ahead that no attempt came to read (a local act)."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[1] is not None:
            ahead[1].discard()


def drive_sync(steps: Steps[T], outlet: Outlet | None = None) -> T:
    """Run a core routine that emits nothing to its end, blocking; return what it returns.

    The same loop as :func:`iterate_sync` without the item channel: this one runs for every
    plain task run, where a generator layer less counts.
    """
    drive = _Drive(outlet)
    send: Any = None
    error: BaseException | None = None
    try:
        while True:
            try:
                step = steps.send(send) if error is None else steps.throw(error)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            send, error = None, None
            try:
                send = _SYNC[type(step)](step, drive)
            except BaseException as exc:  # every outcome goes back to the core
                error = exc
    finally:
        drive.close()


async def drive_async(steps: Steps[T], outlet: Outlet | None = None) -> T:
    """Run a core routine that emits nothing to its end with ``await``."""
    drive = _Drive(outlet)
    send: Any = None
    error: BaseException | None = None
    try:
        while True:
            try:
                step = steps.send(send) if error is None else steps.throw(error)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            send, error = None, None
            try:
                send = await _do_async(step, drive)
            except BaseException as exc:  # every outcome goes back to the core
                error = exc
    finally:
        drive.close()


def iterate_sync(steps: Steps[Any], outlet: Outlet | None = None) -> Generator[Any, None, None]:
    """Carry out ``steps``; yield each emitted item, then a :class:`Finished`."""
    drive = _Drive(outlet)
    send: Any = None
    error: BaseException | None = None
    try:
        while True:
            try:
                step = steps.send(send) if error is None else steps.throw(error)
            except StopIteration as stop:
                yield Finished(stop.value)
                return
            send, error = None, None
            if isinstance(step, Emit):
                try:
                    yield step.item
                except GeneratorExit:
                    _finish_after_close_sync(steps, outlet)
                    raise
                continue
            try:
                send = _SYNC[type(step)](step, drive)
            except BaseException as exc:
                error = exc
    finally:
        drive.close()


async def iterate_async(
    steps: Steps[Any], outlet: Outlet | None = None
) -> AsyncGenerator[Any, None]:
    """Carry out ``steps`` with ``await``; yield each emitted item, then a :class:`Finished`."""
    drive = _Drive(outlet)
    send: Any = None
    error: BaseException | None = None
    try:
        while True:
            try:
                step = steps.send(send) if error is None else steps.throw(error)
            except StopIteration as stop:
                yield Finished(stop.value)
                return
            send, error = None, None
            if isinstance(step, Emit):
                try:
                    yield step.item
                except GeneratorExit:
                    await _finish_after_close_async(steps, outlet)
                    raise
                continue
            try:
                send = await _do_async(step, drive)
            except BaseException as exc:
                error = exc
    finally:
        drive.close()


# -- carrying out one step -----------------------------------------------------------------
def _record(step: Record, drive: _Drive) -> None:
    outlet = drive.outlet
    if outlet is None:
        raise TypeError("a Record step needs the run's environment: pass it to the driver")
    if step.first and outlet.saves_on_create:
        outlet.store.save_run(step.run)
    if outlet.record is not None:
        outlet.record(step.run, step.state)


def _read_cache(step: ReadCache, drive: _Drive) -> Any:
    if step.ahead:
        start_read = getattr(step.store, "start_read", None)
        drive.ahead = (step.key, start_read(step.key) if start_read is not None else None)
        return None
    ahead = drive.ahead
    if ahead is not None and ahead[0] == step.key:
        drive.ahead = None
        if ahead[1] is not None:
            return ahead[1].result()
    return step.store.read(step.key)


def _write_cache(step: WriteCache, drive: _Drive) -> None:
    step.store.write(
        step.key,
        step.value,
        serializer=step.serializer,
        expires_in=step.expires_in,
        task_name=step.task_name,
    )


def _run_hook_sync(step: RunHook, drive: _Drive) -> Any:
    result = step.hook(*step.args)
    return run_awaitable_sync(result) if _awaitable(result) else result


def _call_task_sync(step: CallTask, drive: _Drive) -> Any:
    with step.scope():
        result = timeouts.call_with_timeout(step.fn, step.args, step.kwargs, step.timeout)
        return run_awaitable_sync(result) if step.is_async else result


def _advance_sync(step: Advance, drive: _Drive) -> Any:
    with step.scope():
        return timeouts.call_with_timeout(_next_sync, (step.iterator,), {}, step.timeout)


def _close_items_sync(step: CloseItems, drive: _Drive) -> None:
    closed = step.iterator.aclose() if step.is_async else step.iterator.close()
    if closed is not None:
        run_awaitable_sync(closed)


def _sleep_sync(step: Sleep, drive: _Drive) -> None:
    time.sleep(max(0.0, step.seconds))


def _emit_outside(step: Emit, drive: _Drive) -> None:
    raise TypeError("only generator tasks emit items; use iterate_sync or iterate_async")


_SYNC: dict[type[Any], Callable[[Any, _Drive], Any]] = {
    Record: _record,
    ReadCache: _read_cache,
    WriteCache: _write_cache,
    TakeLock: lambda step, drive: take_lock(step.store, step.key, step.holder, step.ttl),
    ReleaseLock: lambda step, drive: step.lease.release(),
    ComputeKey: lambda step, drive: step.fn(*step.args, **step.kwargs),
    CheckCancelled: lambda step, drive: step.check(),
    RunHook: _run_hook_sync,
    CallTask: _call_task_sync,
    Advance: _advance_sync,
    CloseItems: _close_items_sync,
    Sleep: _sleep_sync,
    Emit: _emit_outside,
}


async def _do_async(step: Step, drive: _Drive) -> Any:
    """Steps that may wait are awaited here; the rest are carried out as the sync driver does."""
    kind = type(step)
    if kind is CallTask:
        return await _call_task_async(step, drive)  # type: ignore[arg-type]
    if kind is RunHook:
        result = step.hook(*step.args)  # type: ignore[union-attr]
        return (await result) if _awaitable(result) else result
    if kind is Advance:
        return await _advance_async(step, drive)  # type: ignore[arg-type]
    if kind is Sleep:
        await anyio.sleep(max(0.0, step.seconds))  # type: ignore[union-attr]
        return None
    if kind is CloseItems and step.is_async:  # type: ignore[union-attr]
        await step.iterator.aclose()  # type: ignore[union-attr]
        return None
    return _SYNC[kind](step, drive)


async def _call_task_async(step: CallTask, drive: _Drive) -> Any:
    with step.scope():
        if step.is_async:
            call = step.fn(*step.args, **step.kwargs)
            if step.timeout is None:  # no cancel scope to enter: the common case
                return await call
            return await timeouts.await_with_timeout(call, step.timeout)
        return timeouts.call_with_timeout(step.fn, step.args, step.kwargs, step.timeout)


async def _advance_async(step: Advance, drive: _Drive) -> Any:
    with step.scope():
        if step.is_async:
            return await timeouts.await_with_timeout(_next_async(step.iterator), step.timeout)
        return timeouts.call_with_timeout(_next_sync, (step.iterator,), {}, step.timeout)


def _awaitable(value: Any) -> bool:
    """Cheaper than ``inspect.isawaitable`` for the plain values most steps return."""
    if value is None or hasattr(type(value), "__await__"):
        return value is not None
    return isinstance(value, types.GeneratorType) and inspect.isawaitable(value)


def _next_sync(iterator: Iterator[Any]) -> tuple[bool, Any]:
    try:
        return False, next(iterator)
    except StopIteration as stop:
        return True, stop.value


async def _next_async(iterator: Any) -> tuple[bool, Any]:
    try:
        return False, await iterator.__anext__()
    except StopAsyncIteration:
        return True, None


def _finish_after_close_sync(steps: Steps[Any], outlet: Outlet | None) -> None:
    """The caller closed the generator: let the core wrap up (hooks) without yielding more."""
    for item in iterate_sync(_throw_into(steps, GeneratorClosed()), outlet):
        if not isinstance(item, Finished):
            break


async def _finish_after_close_async(steps: Steps[Any], outlet: Outlet | None) -> None:
    async for item in iterate_async(_throw_into(steps, GeneratorClosed()), outlet):
        if not isinstance(item, Finished):
            break


def _throw_into(steps: Steps[T], exc: BaseException) -> Steps[T]:
    """A routine that resumes ``steps`` by throwing ``exc`` into it."""
    try:
        step = steps.throw(exc)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    while True:
        outcome = yield step
        try:
            step = steps.send(outcome)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


def run_awaitable_sync(awaitable: Awaitable[Any]) -> Any:
    """Await ``awaitable`` from sync code (async hooks of a sync task).

    With no event loop running in this thread a fresh one is used; under a running loop (a
    sync task called from async code) the awaitable runs on a loop in a helper thread.
    """

    async def wrapper() -> Any:
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wrapper())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(wrapper())
        except BaseException as exc:
            box["error"] = exc

    helper = threading.Thread(target=target, name="taskengine-await")
    helper.start()
    helper.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")
