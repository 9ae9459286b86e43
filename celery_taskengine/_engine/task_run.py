"""The run record: what one task run is and went through, and its JSON document form."""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery_taskengine.states import State, StateType

if TYPE_CHECKING:
    from celery_taskengine._engine.core_env import EngineTask

__all__ = [
    "TaskRun",
    "decode_exception",
    "encode_exception",
    "new_run_id",
    "new_task_run",
    "run_from_document",
]

DOCUMENT_VERSION = 1


@dataclass(slots=True, eq=False)
class TaskRun:
    """One task run: identity, parameters, counters, times, and every state it entered.

    The engine mutates it as the run moves; stores keep it (in memory locally, as a JSON
    document on the result backend in workers) so ``get_task_run(id)`` works from anywhere.
    """

    id: str
    name: str
    task_name: str
    parameters: dict[str, Any] = field(default_factory=dict)
    tags: frozenset[str] = frozenset()
    run_count: int = 0
    start_time: datetime | None = None
    end_time: datetime | None = None
    state: State | None = None
    state_history: list[State] = field(default_factory=list)

    @property
    def state_name(self) -> str | None:
        return self.state.name if self.state is not None else None

    @property
    def state_type(self) -> StateType | None:
        return self.state.type if self.state is not None else None

    def history_names(self) -> list[str]:
        """The names of the states entered, in order (handy in logs and tests)."""
        return [s.name for s in self.state_history]

    def to_document(self) -> dict[str, Any]:
        """A JSON-safe dict; only the current state carries its data."""
        history = [_state_to_dict(s, with_data=False) for s in self.state_history]
        if self.state_history and self.state is not None:
            history[-1] = _state_to_dict(self.state, with_data=True)
        return {
            "v": DOCUMENT_VERSION,
            "id": self.id,
            "name": self.name,
            "task_name": self.task_name,
            "parameters": {k: _jsonable(v) for k, v in self.parameters.items()},
            "tags": sorted(self.tags),
            "run_count": self.run_count,
            "start_time": _iso(self.start_time),
            "end_time": _iso(self.end_time),
            "state_history": history,
        }

    def __repr__(self) -> str:
        return (
            f"TaskRun(id={self.id!r}, name={self.name!r}, state={self.state_name!r}, "
            f"run_count={self.run_count})"
        )


def run_from_document(doc: dict[str, Any]) -> TaskRun:
    """Rebuild a TaskRun from :meth:`TaskRun.to_document` output.

    Raises ``ValueError`` for a document that is not a run record of a known version.
    """
    if not isinstance(doc, dict) or doc.get("v") != DOCUMENT_VERSION:
        raise ValueError("not a celery-taskengine run record")
    try:
        history = [_state_from_dict(s) for s in doc["state_history"]]
        return TaskRun(
            id=str(doc["id"]),
            name=str(doc["name"]),
            task_name=str(doc["task_name"]),
            parameters=dict(doc["parameters"]),
            tags=frozenset(doc["tags"]),
            run_count=int(doc["run_count"]),
            start_time=_from_iso(doc["start_time"]),
            end_time=_from_iso(doc["end_time"]),
            state=history[-1] if history else None,
            state_history=history,
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # int(inf): Overflow
        raise ValueError(f"malformed run record: {exc!r}") from exc


def encode_exception(exc: BaseException) -> dict[str, str]:
    """An exception as plain fields (the same shape Celery uses for JSON results)."""
    cls = type(exc)
    return {"exc_type": cls.__qualname__, "exc_module": cls.__module__, "exc_message": str(exc)}


def decode_exception(fields: dict[str, Any]) -> BaseException:
    """Rebuild an exception from :func:`encode_exception` fields.

    The original class is used when its module is already imported and it can be built from
    its message; otherwise a plain ``Exception`` carrying ``"Type: message"`` keeps the
    information. Like Celery, nothing is imported: a record planted on the backend must not be
    able to run a module's import-time code.
    """
    name = str(fields.get("exc_type", "Exception"))
    module = str(fields.get("exc_module", "builtins"))
    message = str(fields.get("exc_message", ""))
    try:
        cls: Any = sys.modules[module]
        for part in name.split("."):
            cls = getattr(cls, part)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            return _build_exception(cls, message)
    except Exception:
        pass
    return Exception(f"{name}: {message}")


def _build_exception(cls: type[BaseException], message: str) -> BaseException:
    from celery_taskengine.errors import TaskRunTimeoutError

    if issubclass(cls, TaskRunTimeoutError):
        seconds = message.removeprefix("Scope timed out after ").split(" ")[0]
        try:
            return cls(float(seconds))
        except ValueError:
            return TimeoutError(message)
    return cls(message)


def _state_to_dict(state: State, *, with_data: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "type": state.type.value,
        "name": state.name,
        "message": state.message,
        "timestamp": state.timestamp.isoformat(),
        "scheduled_time": _iso(state.scheduled_time),
    }
    if with_data and state.data is not None:
        if isinstance(state.data, BaseException):
            doc["exception"] = encode_exception(state.data)
        else:
            doc["data"] = _jsonable(state.data)
    return doc


def _state_from_dict(doc: dict[str, Any]) -> State:
    if not isinstance(doc, dict):
        raise TypeError(f"a state must be an object, got {type(doc).__name__}")
    data: Any = None
    if "exception" in doc:
        if not isinstance(doc["exception"], dict):
            raise TypeError("a state's 'exception' must be an object")
        data = decode_exception(doc["exception"])
    elif "data" in doc:
        data = doc["data"]
    return State(
        type=StateType(doc["type"]),
        name=str(doc["name"]),
        message=doc.get("message"),
        timestamp=datetime.fromisoformat(doc["timestamp"]),
        scheduled_time=_from_iso(doc.get("scheduled_time")),
        data=data,
    )


def _jsonable(value: Any) -> Any:
    """``value`` if JSON can carry it, else its repr: run records must always be writable."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _from_iso(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


_id_source = random.Random()
os.register_at_fork(after_in_child=_id_source.seed)


def new_run_id() -> str:
    """A random UUID4 string, like Celery's task ids.

    Drawn from a per-process generator (reseeded after fork) rather than ``uuid.uuid4()``,
    whose system call is a noticeable part of a local run's cost.
    """
    n = _id_source.getrandbits(128)
    n = (n & ~(0xC000 << 48)) | (0x8000 << 48)  # RFC 4122 variant
    n = (n & ~(0xF000 << 64)) | (4 << 76)  # version 4
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_task_run(task: EngineTask, parameters: dict[str, Any], task_run_id: Any = None) -> TaskRun:
    """A fresh run record for ``task`` (no state yet; the engine enters Pending)."""
    return TaskRun(
        id=str(task_run_id) if task_run_id is not None else new_run_id(),
        name=task.engine_options.name,
        task_name=task.name,
        parameters=parameters,
        tags=task.engine_options.tags,
    )
