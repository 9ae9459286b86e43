"""The two drivers that carry out the core's steps: one blocking, one with ``await``.

They are deliberately the same loop twice, side by side, so a reader can see that they differ
only by ``await``; all decisions live in the core. Items a generator task yields come out of
:func:`iterate_sync` / :func:`iterate_async` as they are produced.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
import types
from collections.abc import AsyncGenerator, Awaitable, Generator, Iterator
from typing import Any, TypeVar

import anyio

from celery_taskengine import timeouts
from celery_taskengine.steps import Advance, CallTask, Emit, Invoke, Sleep, Step, Steps

__all__ = [
    "Finished",
    "GeneratorClosed",
    "drive_async",
    "drive_sync",
    "iterate_async",
    "iterate_sync",
    "run_awaitable_sync",
]

T = TypeVar("T")


class GeneratorClosed(Exception):
    """Thrown into the core when the caller stops iterating a generator task early."""


class Finished:
    """Wraps the core's return value as the last item of :func:`iterate_async`."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def drive_sync(steps: Steps[T]) -> T:
    """Run a core routine that emits nothing to its end, blocking; return what it returns.

    The same loop as :func:`iterate_sync` without the item channel: this one runs for every
    plain task run, and a generator layer less is a tenth of the engine's cost.
    """
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = steps.send(send) if error is None else steps.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        send, error = None, None
        try:
            send = _do_sync(step)
        except BaseException as exc:  # every outcome goes back to the core
            error = exc


async def drive_async(steps: Steps[T]) -> T:
    """Run a core routine that emits nothing to its end with ``await``."""
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = steps.send(send) if error is None else steps.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        send, error = None, None
        try:
            send = await _do_async(step)
        except BaseException as exc:  # every outcome goes back to the core
            error = exc


def iterate_sync(steps: Steps[Any]) -> Generator[Any, None, None]:
    """Carry out ``steps``; yield each emitted item, then a :class:`Finished`."""
    send: Any = None
    error: BaseException | None = None
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
                _finish_after_close_sync(steps)
                raise
            continue
        try:
            send = _do_sync(step)
        except BaseException as exc:
            error = exc


async def iterate_async(steps: Steps[Any]) -> AsyncGenerator[Any, None]:
    """Carry out ``steps`` with ``await``; yield each emitted item, then a :class:`Finished`."""
    send: Any = None
    error: BaseException | None = None
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
                await _finish_after_close_async(steps)
                raise
            continue
        try:
            send = await _do_async(step)
        except BaseException as exc:
            error = exc


def _do_sync(step: Step) -> Any:
    if isinstance(step, Emit):
        raise TypeError("only generator tasks emit items; use iterate_sync")
    if isinstance(step, Invoke):
        result = step.fn(*step.args)
        return run_awaitable_sync(result) if _awaitable(result) else result
    if isinstance(step, CallTask):
        with step.scope():
            result = timeouts.call_with_timeout(step.fn, step.args, step.kwargs, step.timeout)
            return run_awaitable_sync(result) if step.is_async else result
    if isinstance(step, Advance):
        with step.scope():
            return timeouts.call_with_timeout(_next_sync, (step.iterator,), {}, step.timeout)
    if isinstance(step, Sleep):
        time.sleep(max(0.0, step.seconds))
        return None
    raise TypeError(f"unknown step {step!r}")


async def _do_async(step: Step) -> Any:
    if isinstance(step, Emit):
        raise TypeError("only generator tasks emit items; use iterate_async")
    if isinstance(step, Invoke):
        result = step.fn(*step.args)
        return (await result) if _awaitable(result) else result
    if isinstance(step, CallTask):
        with step.scope():
            if step.is_async:
                call = step.fn(*step.args, **step.kwargs)
                if step.timeout is None:  # no cancel scope to enter: the common case
                    return await call
                return await timeouts.await_with_timeout(call, step.timeout)
            return timeouts.call_with_timeout(step.fn, step.args, step.kwargs, step.timeout)
    if isinstance(step, Advance):
        with step.scope():
            if step.is_async:
                advance = _next_async(step.iterator)
                return await timeouts.await_with_timeout(advance, step.timeout)
            return timeouts.call_with_timeout(_next_sync, (step.iterator,), {}, step.timeout)
    if isinstance(step, Sleep):
        await anyio.sleep(max(0.0, step.seconds))
        return None
    raise TypeError(f"unknown step {step!r}")


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


def _finish_after_close_sync(steps: Steps[Any]) -> None:
    """The caller closed the generator: let the core wrap up (hooks) without yielding more."""
    for item in iterate_sync(_throw_into(steps, GeneratorClosed())):
        if not isinstance(item, Finished):
            break


async def _finish_after_close_async(steps: Steps[Any]) -> None:
    async for item in iterate_async(_throw_into(steps, GeneratorClosed())):
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
