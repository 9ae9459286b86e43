"""The two drivers that carry out the core's steps: one blocking, one with ``await``.

The loops are deliberately the same twice, side by side, so a reader can see that they differ
only by ``await``; all decisions live in the core. A driver holds what the core must not touch:
the environment's store and observers (``Record`` steps), the cache reads sent ahead, and the
leases of SERIALIZABLE locks. Items a generator task yields come out of :func:`iterate_sync` /
:func:`iterate_async` as they are produced.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from typing import Any, TypeVar

from celery_taskengine._engine.step_handlers import ASYNC, SYNC, Drive, Outlet, run_awaitable_sync
from celery_taskengine._engine.steps import CallTask, Emit, GeneratorClosed, Record, Steps

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


class Finished:
    """Wraps the core's return value as the last item of :func:`iterate_async`."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def drive_sync(steps: Steps[T], outlet: Outlet | None = None) -> T:
    """Run a core routine that emits nothing to its end, blocking; return what it returns.

    The same loop as :func:`iterate_sync` without the item channel: this one runs for every
    plain task run, where a generator layer less counts.
    """
    drive = Drive(outlet)
    inline, recorder, handlers = drive.inline, drive.recorder, SYNC
    send: Any = None
    error: BaseException | None = None
    step: Any  # one of steps.Step; Any, since ``type(step) is Record`` narrows nothing
    try:
        while True:
            try:
                step = steps.send(send) if error is None else steps.throw(error)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            send, error = None, None
            try:
                kind = type(step)
                if kind is Record and inline:
                    if recorder is not None:
                        recorder(step.run, step.state)
                    continue
                send = handlers[kind](step, drive)
            except BaseException as exc:  # every outcome goes back to the core
                error = exc
    finally:
        if drive.ahead is not None:
            drive.close()


async def drive_async(steps: Steps[T], outlet: Outlet | None = None) -> T:
    """Run a core routine that emits nothing to its end with ``await``.

    Steps that never wait are carried out inline, as the sync loop does: no coroutine each.
    """
    drive = Drive(outlet)
    inline, recorder, handlers, awaiting = drive.inline, drive.recorder, SYNC, ASYNC
    send: Any = None
    error: BaseException | None = None
    step: Any  # one of steps.Step; Any, since ``type(step) is Record`` narrows nothing
    try:
        while True:
            try:
                step = steps.send(send) if error is None else steps.throw(error)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            send, error = None, None
            try:
                kind = type(step)
                if kind is Record and inline:
                    if recorder is not None:
                        recorder(step.run, step.state)
                    continue
                if kind is CallTask and step.is_async and step.timeout is None:
                    with step.scope():  # an async def's attempt: no coroutine around it
                        send = await step.fn(*step.args, **step.kwargs)
                    continue
                awaited = awaiting.get(kind)
                if awaited is None:
                    send = handlers[kind](step, drive)
                else:
                    send = await awaited(step, drive)
            except BaseException as exc:  # every outcome goes back to the core
                error = exc
    finally:
        if drive.ahead is not None:
            drive.close()


def iterate_sync(steps: Steps[Any], outlet: Outlet | None = None) -> Generator[Any, None, None]:
    """Carry out ``steps``; yield each emitted item, then a :class:`Finished`."""
    drive = Drive(outlet)
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
                send = SYNC[type(step)](step, drive)
            except BaseException as exc:
                error = exc
    finally:
        if drive.ahead is not None:
            drive.close()


async def iterate_async(
    steps: Steps[Any], outlet: Outlet | None = None
) -> AsyncGenerator[Any, None]:
    """Carry out ``steps`` with ``await``; yield each emitted item, then a :class:`Finished`."""
    drive = Drive(outlet)
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
                awaited = ASYNC.get(type(step))  # inline: no coroutine for steps that never wait
                if awaited is None:
                    send = SYNC[type(step)](step, drive)
                else:
                    send = await awaited(step, drive)
            except BaseException as exc:
                error = exc
    finally:
        if drive.ahead is not None:
            drive.close()


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
