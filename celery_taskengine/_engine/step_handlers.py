"""Carrying out one step: what each of the core's steps does, blocking or with ``await``.

The drive loops (:mod:`~celery_taskengine._engine.drivers`) look a step's handler up by its type. A
:class:`Drive` holds what one drive keeps between steps: the place the run executes (its store
and observers, for ``Record``) and the cache read sent ahead of the attempt.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
import types
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

import anyio

from celery_taskengine._engine import timeouts
from celery_taskengine._engine.steps import (
    Advance,
    CallTask,
    CheckCancelled,
    CloseItems,
    ComputeKey,
    Emit,
    ReadCache,
    Record,
    ReleaseLock,
    RunHook,
    Sleep,
    Step,
    TakeLock,
    WriteCache,
)

__all__ = ["ASYNC", "SYNC", "Drive", "Outlet", "do_async", "run_awaitable_sync"]


class Outlet(Protocol):
    """What a driver needs of the place a run executes (a ``RunEnvironment``)."""

    @property
    def store(self) -> Any: ...

    @property
    def observers(self) -> Callable[..., None]: ...


class Drive:
    """One drive's own state: its outlet and the cache read it sent ahead, if any."""

    __slots__ = ("ahead", "inline", "outlet", "recorder")

    def __init__(self, outlet: Outlet | None) -> None:
        self.outlet = outlet
        #: ``(key, pending read or None)`` from a ``ReadCache(ahead=True)``.
        self.ahead: tuple[str, Any] | None = None
        #: Every state of every run is a ``Record`` step, so the loops carry them out inline:
        #: with ``recorder`` (the observers, read once per drive), or nothing at all where
        #: nobody observes the run.
        self.inline = outlet is not None
        observers = None if outlet is None else outlet.observers
        self.recorder: Callable[..., None] | None = observers if observers else None

    def close(self) -> None:
        """Give back a read sent ahead that no attempt came to read (a local act)."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[1] is not None:
            ahead[1].discard()


def _record(step: Record, drive: Drive) -> None:
    outlet = drive.outlet
    if outlet is None:
        raise TypeError("a Record step needs the run's environment: pass it to the driver")
    outlet.observers(step.run, step.state)


def _read_cache(step: ReadCache, drive: Drive) -> Any:
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


def _write_cache(step: WriteCache, drive: Drive) -> None:
    step.store.write(
        step.key,
        step.value,
        serializer=step.serializer,
        expires_in=step.expires_in,
        task_name=step.task_name,
    )


def _run_hook_sync(step: RunHook, drive: Drive) -> Any:
    result = step.hook(*step.args)
    return run_awaitable_sync(result) if _awaitable(result) else result


def _call_task_sync(step: CallTask, drive: Drive) -> Any:
    with step.scope():
        result = timeouts.call_with_timeout(step.fn, step.args, step.kwargs, step.timeout)
        return run_awaitable_sync(result) if step.is_async else result


def _advance_sync(step: Advance, drive: Drive) -> Any:
    with step.scope():
        return timeouts.call_with_timeout(_next_sync, (step.iterator,), {}, step.timeout)


def _close_items_sync(step: CloseItems, drive: Drive) -> None:
    closed = step.iterator.aclose() if step.is_async else step.iterator.close()
    if closed is not None:
        run_awaitable_sync(closed)


def _sleep_sync(step: Sleep, drive: Drive) -> None:
    time.sleep(max(0.0, step.seconds))


def _emit_outside(step: Emit, drive: Drive) -> None:
    raise TypeError("only generator tasks emit items; use iterate_sync or iterate_async")


def _take_lock(step: Any) -> Any:
    """A SERIALIZABLE lock as a lease the store's renewer keeps alive: store plumbing, reached
    only when a run takes a lock (the engine package sits below the store package)."""
    from celery_taskengine._store.lock_lease import take_lock

    return take_lock(step.store, step.key, step.holder, step.ttl)


SYNC: dict[type[Any], Callable[[Any, Drive], Any]] = {
    Record: _record,
    ReadCache: _read_cache,
    WriteCache: _write_cache,
    TakeLock: lambda step, drive: _take_lock(step),
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


async def do_async(step: Step, drive: Drive) -> Any:
    """Steps that may wait are awaited; the rest are carried out as the sync driver does."""
    awaited = ASYNC.get(type(step))
    if awaited is None:
        return SYNC[type(step)](step, drive)
    return await awaited(step, drive)


async def _run_hook_async(step: RunHook, drive: Drive) -> Any:
    result = step.hook(*step.args)
    return (await result) if _awaitable(result) else result


async def _sleep_async(step: Sleep, drive: Drive) -> None:
    await anyio.sleep(max(0.0, step.seconds))


async def _close_items_async(step: CloseItems, drive: Drive) -> None:
    if step.is_async:
        await step.iterator.aclose()
    else:
        step.iterator.close()


async def _call_task_async(step: CallTask, drive: Drive) -> Any:
    with step.scope():
        if step.is_async:
            call = step.fn(*step.args, **step.kwargs)
            if step.timeout is None:  # no cancel scope to enter: the common case
                return await call
            return await timeouts.await_with_timeout(call, step.timeout)
        return timeouts.call_with_timeout(step.fn, step.args, step.kwargs, step.timeout)


async def _advance_async(step: Advance, drive: Drive) -> Any:
    with step.scope():
        if step.is_async:
            return await timeouts.await_with_timeout(_next_async(step.iterator), step.timeout)
        return timeouts.call_with_timeout(_next_sync, (step.iterator,), {}, step.timeout)


ASYNC: dict[type[Any], Callable[[Any, Drive], Awaitable[Any]]] = {
    CallTask: _call_task_async,
    RunHook: _run_hook_async,
    Advance: _advance_async,
    Sleep: _sleep_async,
    CloseItems: _close_items_async,
}


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
