"""The steps the pure engine core asks its drivers to carry out.

The core (:mod:`celery_taskengine.run_core`) and the transaction logic are generators that
yield these steps and receive each step's outcome back (a value, or an exception thrown in).
They never call user code, sleep or touch a store themselves, so one implementation serves
the sync driver and the async driver, which differ only by ``await``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["Advance", "CallTask", "Emit", "Invoke", "Sleep", "Step", "Steps"]

T = TypeVar("T")


@dataclass(slots=True)
class Invoke:
    """Call ``fn(*args)``; if it returns an awaitable, await it (hooks may be async)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


@dataclass(slots=True)
class CallTask:
    """Call the user's function for one attempt, bounded by ``timeout`` seconds.

    ``scope`` is entered around the call (it makes the run current and captures prints).
    """

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    timeout: float | None
    scope: Callable[[], Any]
    is_async: bool = False


@dataclass(slots=True)
class Advance:
    """Take the next item from a (sync or async) generator; the outcome is ``(done, value)``.

    ``value`` is the item, or the generator's return value once ``done``.
    """

    iterator: Any
    timeout: float | None
    scope: Callable[[], Any]
    is_async: bool = False


@dataclass(slots=True)
class Emit:
    """Hand one yielded item to whoever iterates the run (generator tasks only)."""

    item: Any


@dataclass(slots=True)
class Sleep:
    """Wait ``seconds`` (retry delays, lock polling); the async driver does not block."""

    seconds: float
    reason: str = field(default="")


Step = Invoke | CallTask | Advance | Emit | Sleep
#: A generator of steps returning ``T``: the shape of every core routine.
Steps = Generator[Step, Any, T]
