"""The result backend's view of an engine run: Celery task states beyond Celery's own.

While a run is in a state Celery has no name for, the backend's task meta says so:
``AsyncResult(id).state`` reads ``RUNNING``, ``RETRYING``, ``AWAITING_RETRY``, ... and
``.info`` the engine state, run count and scheduled time. Final states are Celery's to write
(SUCCESS, FAILURE, REVOKED); ours never overwrite them, which is checked inside Redis.
"""

from __future__ import annotations

import json
import math
import re
import traceback as tracebacks
from typing import TYPE_CHECKING, Any

import redis
from celery.backends.rpc import RPCBackend

from celery_taskengine._engine.task_run import TaskRun, encode_exception
from celery_taskengine._store.protocol import ResultStore
from celery_taskengine.states import State, utcnow

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "SET_META_LUA",
    "awaiting_retry_meta",
    "celery_status",
    "encode_meta",
    "keeps_meta_on_redis",
    "px",
    "save_run_with_meta",
    "state_info",
    "write_task_meta",
]

# Sets the backend's task meta unless a final one (or, with an expected status, another one)
# is there. Meta written with a serializer Lua cannot decode is left alone.
_SET_META_FN = """
local function set_meta(key, value, px, expected)
  local current = redis.call('get', key)
  if current then
    local ok, meta = pcall(cjson.decode, current)
    if not ok or type(meta) ~= 'table' then return 0 end
    local status = meta['status']
    if status == 'SUCCESS' or status == 'FAILURE' or status == 'REVOKED' then return 0 end
    if expected ~= '' and status ~= expected then return 0 end
  elseif expected ~= '' then
    return 0
  end
  if px ~= '0' then redis.call('set', key, value, 'PX', px) else redis.call('set', key, value) end
  return 1
end
"""
#: KEYS: meta. ARGV: meta, px, expected status ('' for any).
SET_META_LUA = _SET_META_FN + "return set_meta(KEYS[1], ARGV[1], ARGV[2], ARGV[3])"
_SNAKE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|[^A-Za-z0-9]+")
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def celery_status(state: State) -> str | None:
    """The backend task state shown for ``state`` (``AwaitingRetry`` -> ``AWAITING_RETRY``).

    ``None`` for Pending, for final states Celery records itself (SUCCESS, FAILURE, REVOKED)
    and for Ignored (Celery's ``Ignore`` stores nothing: a state the task set stays).
    """
    if state.name in _NOT_SHOWN or (state.is_final() and not state.is_crashed()):
        return None
    status = _STATUS_NAMES.get(state.name)
    if status is None:
        status = _STATUS_NAMES.setdefault(
            state.name, _SNAKE.sub("_", state.name).strip("_").upper()
        )
    return status


_STATUS_NAMES: dict[str, str] = {}
_NOT_SHOWN = frozenset({"Pending", "Ignored"})


def keeps_meta_on_redis(backend: Any) -> bool:
    """Whether Celery keeps task meta on a Redis server (its scripts can write it)."""
    return isinstance(getattr(backend, "client", None), redis.Redis)


def write_task_meta(
    app: Celery,
    task_id: str,
    status: str,
    result: Any,
    *,
    expected: str = "",
    traceback: str | None = None,
) -> bool:
    """Set the backend's meta of ``task_id`` (one round trip), never over a final one."""
    backend = app.backend
    meta = backend.encode(_meta(task_id, status, result, traceback=traceback))
    keys = [backend.get_key_for_task(task_id)]
    return bool(backend.client.eval(SET_META_LUA, 1, *keys, meta, px(backend.expires), expected))


def state_info(run: TaskRun, state: State) -> dict[str, Any]:
    """What ``AsyncResult(id).info`` shows while the run is in ``state``."""
    scheduled = state.scheduled_time.isoformat() if state.scheduled_time is not None else None
    return {
        "engine_state": state.name,
        "run_count": run.run_count,
        "message": state.message,
        "scheduled_time": scheduled,
    }


def awaiting_retry_meta(
    backend: Any, run: TaskRun, state: State
) -> tuple[dict[str, Any], str | None]:
    """The ``result`` and ``traceback`` of AWAITING_RETRY meta.

    Besides the engine's fields it carries what Celery's RETRY meta does: the exception being
    retried, in the backend's own exception fields (``exc_type``, ``exc_message``,
    ``exc_module``: ``backend.exception_to_python`` rebuilds it), and its traceback.
    """
    info = state_info(run, state)
    cause = state.data
    if not isinstance(cause, BaseException):
        return info, None
    fields = backend.prepare_exception(cause)
    info.update(fields if isinstance(fields, dict) else encode_exception(cause))
    if cause.__traceback__ is None:
        return info, None
    lines = tracebacks.format_exception(type(cause), cause, cause.__traceback__)
    return info, "".join(lines)


def encode_meta(backend: Any, task_id: str, status: str, result: Any) -> bytes | str:
    """The backend's encoded task meta for a run not finished yet."""
    meta = _meta(task_id, status, result)
    if backend.serializer == "json" and not getattr(backend, "compression", None):
        return _ENCODER.encode(meta)  # what the backend's JSON would be, for less
    encoded: bytes | str = backend.encode(meta)
    return encoded


def save_run_with_meta(
    app: Celery, store: ResultStore, run: TaskRun, status: str, result: Any
) -> None:
    """Save a run that never reaches a worker, with its final backend state (one round trip).

    Used for runs answered at send time; Celery's result readers see ``status`` and ``result``.
    """
    backend = app.backend
    save_with_meta = getattr(store, "save_run_with_task_meta", None)
    if save_with_meta is None or not store.rides_with(backend):
        store.save_run(run)  # the run record, then Celery's result through Celery
        if not isinstance(backend, RPCBackend):  # rpc:// answers only the caller, who has it
            backend.store_result(run.id, result, status)
        return
    meta = backend.encode(_meta(run.id, status, result, date_done=utcnow().isoformat()))
    save_with_meta(run, backend.get_key_for_task(run.id), meta, _px_int(backend.expires))


def _meta(
    task_id: str,
    status: str,
    result: Any,
    *,
    date_done: str | None = None,
    traceback: str | None = None,
) -> dict[str, Any]:
    # The shape Celery's backends store (backends/base.py _get_result_meta).
    return {
        "status": status,
        "result": result,
        "traceback": traceback,
        "children": [],
        "date_done": date_done,
        "task_id": task_id,
    }


def px(seconds: float | None) -> str:
    """Milliseconds for a Lua script's PX argument; ``"0"`` means no expiry."""
    return str(_px_int(seconds) or 0)


def _px_int(seconds: float | None) -> int | None:
    """Milliseconds for redis-py's ``px=``; ``None`` means no expiry."""
    if not seconds or seconds <= 0:
        return None
    return max(1, math.ceil(seconds * 1000))
