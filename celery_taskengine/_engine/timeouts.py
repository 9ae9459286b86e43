"""Bounding one attempt in time, for sync and async functions, on any thread.

- async functions: an anyio cancel scope; the coroutine is cancelled at the deadline.
- sync functions on the main thread: SIGALRM interrupts the call (sleeps included).
- sync functions elsewhere (Celery's threads pool, ``start_worker``, executors): the call runs
  in a helper thread; at the deadline the caller gets :class:`TaskRunTimeoutError` at once, the
  helper is sent an asynchronous exception, and a call stuck in C code is abandoned and logged.
"""

from __future__ import annotations

import contextvars
import ctypes
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio

from celery_taskengine._engine.run_scope import current_task_run
from celery_taskengine.errors import TaskRunTimeoutError

__all__ = ["await_with_timeout", "call_with_timeout"]

logger = logging.getLogger(__name__)

#: How long a helper thread may take to honour the asynchronous exception before it is
#: declared stuck (abandoned and logged). The caller does not wait for this.
ABANDON_AFTER_SECONDS = 1.0


def call_with_timeout(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any], timeout: float | None
) -> Any:
    """``fn(*args, **kwargs)``, raising :class:`TaskRunTimeoutError` after ``timeout`` seconds."""
    if timeout is None:
        return fn(*args, **kwargs)
    if _can_use_alarm():
        return _call_with_alarm(fn, args, kwargs, timeout)
    return _call_in_helper_thread(fn, args, kwargs, timeout)


async def await_with_timeout(awaitable: Awaitable[Any], timeout: float | None) -> Any:
    """Await ``awaitable``, cancelling it and raising TaskRunTimeoutError after ``timeout`` s.

    A ``TimeoutError`` the function raises itself passes through unchanged.
    """
    if timeout is None:
        return await awaitable
    result: Any = None
    with anyio.move_on_after(timeout) as scope:
        result = await awaitable
    if scope.cancelled_caught:
        raise TaskRunTimeoutError(timeout)
    return result


def _can_use_alarm() -> bool:
    if threading.current_thread() is not threading.main_thread():
        return False
    if not hasattr(signal, "setitimer"):
        return False
    # Someone else's alarm (or a running itimer) must not be clobbered.
    handler = signal.getsignal(signal.SIGALRM)
    if handler not in (signal.SIG_DFL, signal.SIG_IGN, None):
        return False
    return signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def _call_with_alarm(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any], timeout: float
) -> Any:
    def on_alarm(signum: int, frame: object) -> None:
        raise _DeadlinePassed

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return fn(*args, **kwargs)
        finally:
            # An alarm landing right here still raises, but the handler below is restored.
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _DeadlinePassed:
        raise TaskRunTimeoutError(timeout) from None
    finally:
        signal.signal(signal.SIGALRM, previous)


class _DeadlinePassed(BaseException):
    """Raised by SIGALRM wherever the attempt is. Not a ``TimeoutError`` (a socket timeout to
    client libraries, which would convert or retry it) nor an ``Exception`` (which the
    function's own handlers would swallow); converted once it has left the function."""


def _call_in_helper_thread(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any], timeout: float
) -> Any:
    outcome: dict[str, Any] = {}
    done = threading.Event()
    context = contextvars.copy_context()

    def target() -> None:
        try:
            try:
                outcome["value"] = context.run(fn, *args, **kwargs)
            except BaseException as exc:
                outcome["error"] = exc
            finally:
                done.set()
        except _AttemptAbandoned:
            pass  # the interruption arrived after the work ended: nothing is left to stop

    helper = threading.Thread(target=target, name=f"taskengine-timeout-{fn!r:.40}", daemon=True)
    helper.start()
    if not done.wait(timeout):
        _interrupt(helper, timeout)
        raise TaskRunTimeoutError(timeout)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


class _AttemptAbandoned(BaseException):
    """Raised asynchronously inside a helper thread whose caller already timed out (a
    ``BaseException`` for the reasons given at :class:`_DeadlinePassed`)."""


def _interrupt(helper: threading.Thread, timeout: float) -> None:
    """Ask ``helper`` to stop; if it is stuck in C code, say so once it stays stuck."""
    ident = helper.ident
    if ident is not None and helper.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(ident), ctypes.py_object(_AttemptAbandoned)
        )
    run = current_task_run()  # read here: the watcher thread does not share our context
    run_id = run.id if run is not None else "-"

    def watch() -> None:
        helper.join(ABANDON_AFTER_SECONDS)
        if helper.is_alive():
            logger.warning(
                "%s: a task call that exceeded its %ss timeout is blocked in code that cannot "
                "be interrupted; it was abandoned in thread %r and will finish on its own.",
                run_id,
                timeout,
                helper.name,
            )

    threading.Thread(target=watch, name="taskengine-timeout-watch", daemon=True).start()
