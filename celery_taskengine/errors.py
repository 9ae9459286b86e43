"""Every error celery-taskengine raises, as one small hierarchy.

TaskEngineError
├── ConfigurationError        a task, policy or app is set up in a way that cannot work
│   ├── ReservedArgumentError a task function uses a parameter name the engine owns
│   └── StorePermissionError  the store's user may not touch the engine's keys (ACL NOPERM)
├── SerializationError        a value cannot be encoded with the chosen serializer
├── InvalidArguments          arguments do not fit their pydantic models (also a ValueError)
├── TaskRunTimeoutError       an attempt exceeded ``timeout_seconds`` (also a TimeoutError)
├── StoreUnavailableError     the result backend cannot be reached
├── RetryRequested            ``self.retry()`` inside an engine task: the engine retries
└── RunResultError            ``State.result()`` has no value to give
    ├── FailedRun             a failed state that holds no exception
    ├── CrashedRun            a crashed state that holds no exception
    ├── CancelledRun          a cancelled state that holds no exception
    ├── PausedRun             a paused state
    └── UnfinishedRun         a state that is not final yet
"""

from __future__ import annotations

from typing import Any


class TaskEngineError(Exception):
    """Root of every error raised by celery-taskengine."""


class ConfigurationError(TaskEngineError, ValueError):
    """A task, cache policy or Celery app is configured in a way that cannot work."""


class ReservedArgumentError(ConfigurationError, TypeError):
    """A task function declares a parameter name the engine reserves for itself."""


class StorePermissionError(ConfigurationError):
    """The store's server refuses the engine's keys or commands to its user (an ACL)."""


class SerializationError(TaskEngineError, TypeError):
    """A value cannot be encoded with the serializer the task or app uses."""


class InvalidArguments(TaskEngineError, ValueError):
    """A ``pydantic=True`` run's arguments do not fit their models; the message is pydantic's.

    pydantic's own ``ValidationError`` (kept as ``__cause__`` where it was raised) cannot be
    rebuilt from a result backend, so a worker's caller would lose its message.
    """


class StoreUnavailableError(TaskEngineError, ConnectionError):
    """The result backend holding run records and cached results cannot be reached."""


class TaskRunTimeoutError(TaskEngineError, TimeoutError):
    """An attempt ran longer than the task's ``timeout_seconds``."""

    def __init__(self, timeout_seconds: float | str) -> None:
        # Celery rebuilds a stored exception as ``cls(*args)``, i.e. from the message: accept it.
        if isinstance(timeout_seconds, str):
            timeout_seconds = _seconds_in_message(timeout_seconds)
        self.timeout_seconds = float(timeout_seconds)
        super().__init__(f"Scope timed out after {self.timeout_seconds} second(s).")

    def __reduce__(self) -> tuple[type[TaskRunTimeoutError], tuple[float]]:
        return (type(self), (self.timeout_seconds,))


class RetryRequested(TaskEngineError):
    """Raised by ``self.retry()`` in an engine task's body: the engine schedules the retry.

    Celery's ``retry`` publishes a new message behind the engine's back; inside an engine run
    it raises this instead, and the run enters AwaitingRetry (counted against ``retries``).
    ``delay`` is in seconds; ``None`` means the task's own retry delays. ``limit`` is how many
    retries this request may reach (``self.retry()``'s, which may differ from ``retries``);
    ``message_options`` go with the message that carries the retry (``expires``).
    """

    def __init__(
        self,
        exc: BaseException | str | None = None,
        delay: float | None = None,
        limit: int | None = None,
        message_options: dict[str, Any] | None = None,
    ) -> None:
        self.exc = exc
        self.delay = delay
        self.limit = limit
        self.message_options = dict(message_options or {})
        when = "with the task's retry delay" if delay is None else f"in {delay:g}s"
        super().__init__(f"Retry {when}: {exc!r}" if exc is not None else f"Retry {when}")


class RunResultError(TaskEngineError):
    """A state's result was asked for, but the state holds no value to give."""


class FailedRun(RunResultError):
    """The run failed and its state holds no exception object; the message is the state's."""


class CrashedRun(RunResultError):
    """The run crashed and its state holds no exception object."""


class CancelledRun(RunResultError):
    """The run was cancelled."""


class PausedRun(RunResultError):
    """The run is paused; it has no result yet."""


class UnfinishedRun(RunResultError):
    """The run has not reached a final state, so it has no result yet."""


def _seconds_in_message(message: str) -> float:
    """The seconds in ``"Scope timed out after 0.5 second(s)."`` (or a bare number)."""
    text = message.removeprefix("Scope timed out after ").split(" ")[0]
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"not a timeout message: {message!r}") from None
