"""The steps the pure engine core asks its drivers to carry out.

The core (:mod:`celery_taskengine._engine.run_core`) and the transaction logic are generators that
yield these steps and receive each step's outcome back (a value, or an exception thrown in).
They never call user code, sleep or touch a store themselves, so one implementation serves
the sync driver and the async driver, which differ only by ``await``. Each step names what it
does, so a test can read a run as a sequence of steps without executing any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from celery_taskengine._engine.task_run import TaskRun
    from celery_taskengine.states import State

__all__ = [
    "Advance",
    "CallTask",
    "CheckCancelled",
    "CloseItems",
    "ComputeKey",
    "Emit",
    "GeneratorClosed",
    "ReadCache",
    "Record",
    "ReleaseLock",
    "RunHook",
    "Sleep",
    "Step",
    "Steps",
    "TakeLock",
    "WriteCache",
    "hook_name",
]

T = TypeVar("T")


class GeneratorClosed(Exception):
    """Thrown into the core when the caller stops iterating a generator task early."""


@dataclass(slots=True)
class Record:
    """The run entered ``state``: persist and publish it (the driver holds the observers).

    ``first``: the run's first state; a store that keeps the live run object saves it now.
    """

    run: TaskRun
    state: State
    first: bool = False


@dataclass(slots=True)
class ReadCache:
    """The committed record under ``key`` in ``store``, or ``None``.

    ``ahead``: the key is known before the attempt; the driver may send the read now (a store
    with ``start_read``) and answer the next ``ReadCache`` of this key from it. Outcome ``None``.
    """

    store: Any
    key: str
    ahead: bool = False


@dataclass(slots=True)
class WriteCache:
    """Write a committed value under ``key`` (a transaction's commit)."""

    store: Any
    key: str
    value: Any
    serializer: str
    expires_in: float | None
    task_name: str | None


@dataclass(slots=True)
class TakeLock:
    """Try once to take a SERIALIZABLE lock; the outcome is a lease (kept alive by the driver
    until released) or ``None`` when another holder has it."""

    store: Any
    key: str
    holder: str
    ttl: float


@dataclass(slots=True)
class ReleaseLock:
    """Give back a lease :class:`TakeLock` returned."""

    lease: Any


@dataclass(slots=True)
class ComputeKey:
    """Call user code that computes a value the run needs: its cache key, its run name."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RunHook:
    """Call a hook (state, commit/rollback hooks, a retry condition); awaited if async."""

    hook: Callable[..., Any]
    args: tuple[Any, ...]
    kind: str


@dataclass(slots=True)
class CheckCancelled:
    """Ask whether the run was cancelled (revoked); the outcome is a bool."""

    check: Callable[[], bool]


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
class CloseItems:
    """Close a generator task's iterator its caller stopped reading."""

    iterator: Any
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


Step = (
    Record
    | ReadCache
    | WriteCache
    | TakeLock
    | ReleaseLock
    | ComputeKey
    | RunHook
    | CheckCancelled
    | CallTask
    | Advance
    | CloseItems
    | Emit
    | Sleep
)
#: A generator of steps returning ``T``: the shape of every core routine.
Steps = Generator[Step, Any, T]


def hook_name(hook: Callable[..., Any]) -> str:
    """A hook's name for logs (``functools.partial`` shows the function it wraps)."""
    inner = getattr(hook, "func", hook)
    return str(getattr(inner, "__name__", type(inner).__name__))
