"""Run states: frozen values, the names the engine uses, and the one table of legal transitions."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from celery_taskengine import errors

__all__ = [
    "AwaitingRetry",
    "Cached",
    "Cancelled",
    "Completed",
    "Crashed",
    "Failed",
    "NotReady",
    "Paused",
    "Pending",
    "Retrying",
    "Running",
    "Scheduled",
    "State",
    "StateType",
    "TimedOut",
    "aggregate_states",
    "is_legal_transition",
    "utcnow",
]


class StateType(str, enum.Enum):
    """The kind of a state; names like ``Cached`` or ``TimedOut`` refine a type."""

    SCHEDULED = "SCHEDULED"  #: waiting for a time (AwaitingRetry)
    PENDING = "PENDING"  #: created, not started (Pending, NotReady)
    RUNNING = "RUNNING"  #: an attempt is executing (Running, Retrying)
    COMPLETED = "COMPLETED"  #: final, with a value (Completed, Cached)
    FAILED = "FAILED"  #: final, with an exception (Failed, TimedOut)
    CANCELLED = "CANCELLED"  #: final, stopped on request
    CRASHED = "CRASHED"  #: the process or a BaseException ended the attempt
    PAUSED = "PAUSED"  #: never produced by this engine; kept for API parity
    CANCELLING = "CANCELLING"  #: never produced by this engine; kept for API parity


FINAL_TYPES = frozenset(
    {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}
)


def utcnow() -> datetime:
    """The current time as an aware UTC datetime (the engine's only notion of 'now')."""
    return datetime.now(timezone.utc)


@dataclass(frozen=True, slots=True)
class State:
    """One state a run entered: type, display name, message, time and data.

    ``data`` holds the return value (COMPLETED) or the exception (FAILED, CRASHED); it is the
    very object for local runs and the decoded value for runs read from a result backend.
    """

    type: StateType
    name: str = ""
    message: str | None = None
    timestamp: datetime = field(default_factory=utcnow)
    scheduled_time: datetime | None = None
    data: Any = None

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.type.value.title())

    def is_scheduled(self) -> bool:
        return self.type is StateType.SCHEDULED

    def is_pending(self) -> bool:
        return self.type is StateType.PENDING

    def is_running(self) -> bool:
        return self.type is StateType.RUNNING

    def is_completed(self) -> bool:
        return self.type is StateType.COMPLETED

    def is_failed(self) -> bool:
        return self.type is StateType.FAILED

    def is_crashed(self) -> bool:
        return self.type is StateType.CRASHED

    def is_cancelled(self) -> bool:
        return self.type is StateType.CANCELLED

    def is_paused(self) -> bool:
        return self.type is StateType.PAUSED

    def is_final(self) -> bool:
        return self.type in FINAL_TYPES

    def with_data(self, data: Any) -> State:
        """The same state carrying other data (used when a backend decodes a value)."""
        return replace(self, data=data)

    def result(self, raise_on_failure: bool = True) -> Any:
        """The run's value; raise the stored exception (or a RunResultError) if it has none.

        With ``raise_on_failure=False`` a failed state returns its exception object instead.
        """
        if self.type is StateType.PAUSED:
            raise errors.PausedRun(self.message or "Run is paused.")
        if not self.is_final():
            raise errors.UnfinishedRun(
                f"Run is in {self.type.value} state, its result is not available."
            )
        if self.type is StateType.COMPLETED:
            return self.data
        if isinstance(self.data, BaseException):
            if raise_on_failure:
                raise self.data
            return self.data
        if not raise_on_failure:
            return self.data
        wrapper = {
            StateType.FAILED: errors.FailedRun,
            StateType.CRASHED: errors.CrashedRun,
            StateType.CANCELLED: errors.CancelledRun,
        }[self.type]
        text = self.data if isinstance(self.data, str) else self.message
        raise wrapper(text or f"Run ended in state {self.name!r}.")

    def __str__(self) -> str:
        shown_type = "" if self.name.upper() == self.type.value else f", type={self.type.value}"
        return f"{self.name}({self.message!r}{shown_type})"

    def __repr__(self) -> str:
        return f"<State {self}>"


def Scheduled(
    scheduled_time: datetime, name: str = "Scheduled", message: str | None = None
) -> State:
    return State(StateType.SCHEDULED, name, message, scheduled_time=scheduled_time)


def AwaitingRetry(
    scheduled_time: datetime, message: str | None = None, timestamp: datetime | None = None
) -> State:
    now = timestamp or utcnow()
    return State(StateType.SCHEDULED, "AwaitingRetry", message, now, scheduled_time=scheduled_time)


def Pending(message: str | None = None, name: str = "Pending") -> State:
    return State(StateType.PENDING, name, message)


def NotReady(message: str | None = None) -> State:
    return State(StateType.PENDING, "NotReady", message)


def Running(message: str | None = None, name: str = "Running") -> State:
    return State(StateType.RUNNING, name, message)


def Retrying(message: str | None = None) -> State:
    return State(StateType.RUNNING, "Retrying", message)


def Completed(data: Any = None, message: str | None = None, name: str = "Completed") -> State:
    return State(StateType.COMPLETED, name, message, data=data)


def Cached(data: Any = None, message: str | None = None) -> State:
    return State(StateType.COMPLETED, "Cached", message, data=data)


def Failed(data: Any = None, message: str | None = None, name: str = "Failed") -> State:
    return State(StateType.FAILED, name, message, data=data)


def TimedOut(data: Any = None, message: str | None = None) -> State:
    return State(StateType.FAILED, "TimedOut", message, data=data)


def Crashed(data: Any = None, message: str | None = None) -> State:
    return State(StateType.CRASHED, "Crashed", message, data=data)


def Cancelled(data: Any = None, message: str | None = None) -> State:
    return State(StateType.CANCELLED, "Cancelled", message, data=data)


def Paused(message: str | None = None) -> State:
    return State(StateType.PAUSED, "Paused", message)


_S = StateType
#: Which state types may follow which. Names refine types; the engine's named states all obey
#: this table, and so do states a task returns. CRASHED may be followed by RUNNING because a
#: redelivered message continues the same run after the worker that ran it died.
TRANSITIONS: dict[StateType, frozenset[StateType]] = {
    _S.PENDING: frozenset({_S.PENDING, _S.RUNNING, _S.COMPLETED, _S.CANCELLED, _S.CRASHED}),
    _S.RUNNING: frozenset(
        {_S.RUNNING, _S.SCHEDULED, _S.COMPLETED, _S.FAILED, _S.CRASHED, _S.CANCELLED, _S.PAUSED}
    ),
    _S.SCHEDULED: frozenset({_S.RUNNING, _S.CANCELLED, _S.CRASHED}),
    _S.CRASHED: frozenset({_S.RUNNING, _S.CANCELLED}),
    _S.PAUSED: frozenset({_S.RUNNING, _S.CANCELLED}),
    _S.CANCELLING: frozenset({_S.CANCELLED}),
    _S.COMPLETED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
}


def is_legal_transition(current: State | None, new: State) -> bool:
    """Whether ``new`` may follow ``current`` (``None``: the run is being created)."""
    if current is None:
        return new.type is StateType.PENDING
    return new.type in TRANSITIONS[current.type]


def aggregate_states(states: Iterable[State]) -> State:
    """Fold the states a task returned as a collection into one final state."""
    collected = list(states)
    total = len(collected)
    cancelled = sum(1 for s in collected if s.is_cancelled())
    paused = sum(1 for s in collected if s.is_paused())
    failed = sum(1 for s in collected if s.is_failed() or s.is_crashed())
    if all(s.is_completed() for s in collected):
        return Completed(data=[s.data for s in collected], message="All states completed.")
    if cancelled:
        return Cancelled(message=f"{cancelled}/{total} states cancelled.")
    if paused:
        return Paused(message=f"{paused}/{total} states paused.")
    return Failed(message=f"{failed}/{total} states failed.")
