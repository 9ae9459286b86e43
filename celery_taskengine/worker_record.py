"""Recording a worker run's states: the run record, the backend's task state, and events.

Every state change of a run in a worker is persisted (so ``get_task_run(id)`` works anywhere
and a redelivery can continue the run), shown in the result backend (``AsyncResult(id).state``
reads ``RUNNING``, ``RETRYING``, ``AWAITING_RETRY``, ...) and, if it has no Celery twin,
announced as a task event. Recording is on every task's hot path, so it costs as little as it
can (see :mod:`~celery_taskengine.redis_oneway` for the measurements):

- Pending is held back and written together with Running; a plain run writes twice, at Running
  and at its final state, each a single send that does not wait for Redis to answer.
- The backend's task state is written only for states Celery does not write itself (not for
  final Completed/Failed/Cancelled: Celery's trace stores SUCCESS/FAILURE/REVOKED right after),
  and never over a SUCCESS, FAILURE or REVOKED already there (checked inside Redis).
- AwaitingRetry is written blocking: the retry's delivery, maybe on another worker, reads it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any

from celery_taskengine.events import send_state_event
from celery_taskengine.redis_oneway import RecordChannel
from celery_taskengine.result_store import ResultStore
from celery_taskengine.states import State, StateType, utcnow
from celery_taskengine.task_run import (
    DOCUMENT_VERSION,
    TaskRun,
    _jsonable,
    _state_to_dict,
)

if TYPE_CHECKING:
    from celery import Celery

    from celery_taskengine.redis_store import RedisStore

__all__ = [
    "Delivery",
    "DeliveryRecorder",
    "RunDocument",
    "celery_status",
    "save_run_with_meta",
    "state_info",
    "write_task_meta",
]

logger = logging.getLogger(__name__)

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
_SET_META_LUA = _SET_META_FN + "return set_meta(KEYS[1], ARGV[1], ARGV[2], ARGV[3])"
#: Saves a run unless its stored record already ended: a crash seen while the worker's main
#: process records a revoke (``terminate=True`` kills the attempt) must not undo the Cancelled.
#: KEYS: run. ARGV: document, px ('0' for none).
_SAVE_UNLESS_ENDED_LUA = """
local current = redis.call('get', KEYS[1])
if current then
  local ok, doc = pcall(cjson.decode, current)
  if ok and type(doc) == 'table' and type(doc['state_history']) == 'table' then
    local history = doc['state_history']
    local last = history[#history]
    if last and (last['type'] == 'COMPLETED' or last['type'] == 'FAILED'
        or last['type'] == 'CANCELLED' or last['type'] == 'CRASHED') then
      return 0
    end
  end
end
if ARGV[2] ~= '0' then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
else redis.call('set', KEYS[1], ARGV[1]) end
return 1
"""
_SNAKE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|[^A-Za-z0-9]+")
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_json_str: Callable[[str], str] = encode_basestring_ascii  # a JSON string literal, in C


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the bridge needs of Celery's request, read once in the delivery's own thread."""

    task_id: str
    workflow_id: str  #: RUN_ID keys use it (see worker_run._workflow_id)
    hostname: str | None
    retries: int
    redelivered: bool
    send_events: bool
    #: Records may ride on Celery's next backend command (see redis_oneway).
    piggyback: bool = False


def celery_status(state: State) -> str | None:
    """The backend task state shown for ``state`` (``AwaitingRetry`` -> ``AWAITING_RETRY``).

    ``None`` for Pending and for final states Celery records itself (SUCCESS, FAILURE, REVOKED).
    """
    if state.name == "Pending" or (state.is_final() and not state.is_crashed()):
        return None
    status = _STATUS_NAMES.get(state.name)
    if status is None:
        status = _STATUS_NAMES.setdefault(
            state.name, _SNAKE.sub("_", state.name).strip("_").upper()
        )
    return status


_STATUS_NAMES: dict[str, str] = {}


def write_task_meta(
    app: Celery, task_id: str, status: str, result: Any, *, expected: str = ""
) -> bool:
    """Set the backend's meta of ``task_id`` (one round trip), never over a final one."""
    backend = app.backend
    meta = backend.encode(_meta(task_id, status, result))
    keys = [backend.get_key_for_task(task_id)]
    return bool(backend.client.eval(_SET_META_LUA, 1, *keys, meta, _px(backend.expires), expected))


class DeliveryRecorder:
    """The ``record`` callback of a worker run on a Redis store (see the module docstring)."""

    def __init__(
        self,
        app: Celery,
        store: RedisStore,
        delivery: Delivery,
        *,
        on_attempt: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.store = store
        self.delivery = delivery
        self.on_attempt = on_attempt
        self._channel = _channel_for(store)
        self._run_key = store.key_for("run", delivery.task_id)
        self._run_px = _px(store.run_expires)
        self._document: RunDocument | None = None
        #: No backend meta can exist before a message's first delivery starts.
        self._meta_is_new = not (delivery.retries or delivery.redelivered)

    def __call__(self, run: TaskRun, state: State) -> None:
        if state.name == "Pending" and len(run.state_history) == 1:
            return  # held back: written with Running
        if self._document is None:
            self._document = RunDocument(run)
        document = self._document.encode(run)
        save: tuple[Any, ...] = ("SET", self._run_key, document)
        if state.is_crashed():
            save = ("EVAL", _SAVE_UNLESS_ENDED_LUA, 1, self._run_key, document, self._run_px)
        elif self._run_px != "0":
            save += ("PX", self._run_px)
        piggyback = self.delivery.piggyback
        if state.is_scheduled():
            self._channel.send_blocking(save, piggyback=piggyback)
        else:
            commands = [save]
            status = celery_status(state)
            if status is not None:
                commands.append(self._meta_command(run, state, status))
            # An attempt's start may travel with its end (see redis_oneway).
            hold = state.type is StateType.RUNNING
            self._channel.send(*commands, piggyback=piggyback, hold=hold)
        if state.type is StateType.RUNNING and self.on_attempt is not None:
            self.on_attempt()
        if self.delivery.send_events:
            d = self.delivery
            send_state_event(self.app, d.hostname, d.task_id, run, state)

    def _meta_command(self, run: TaskRun, state: State, status: str) -> tuple[Any, ...]:
        backend = self.app.backend
        meta = _meta(self.delivery.task_id, status, state_info(run, state))
        encoded = _ENCODER.encode(meta) if _plain_json(backend) else backend.encode(meta)
        key = backend.get_key_for_task(self.delivery.task_id)
        px = _px(backend.expires)
        if self._meta_is_new:  # nothing to protect: a plain SET NX is enough (and cheaper)
            self._meta_is_new = False
            return (
                ("SET", key, encoded, "NX") if px == "0" else ("SET", key, encoded, "PX", px, "NX")
            )
        return ("EVAL", _SET_META_LUA, 1, key, encoded, px, "")


class RunDocument:
    """A run's JSON document (as :meth:`TaskRun.to_document` gives it), built incrementally.

    A run is saved at every state change; its parameters and the states already entered never
    change, so they are encoded once.
    """

    def __init__(self, run: TaskRun) -> None:
        try:
            self._parameters = _ENCODER.encode(run.parameters)
        except (TypeError, ValueError):  # some value is not JSON: its repr stands in
            parameters = {name: _jsonable(value) for name, value in run.parameters.items()}
            self._parameters = _ENCODER.encode(parameters)
        self._head = _ENCODER.encode(
            {"v": DOCUMENT_VERSION, "id": run.id, "task_name": run.task_name}
        )[:-1]
        self._tags = _ENCODER.encode(sorted(run.tags))
        self._states: list[str] = []

    def encode(self, run: TaskRun) -> str:
        history = run.state_history
        while len(self._states) < len(history) - 1:
            self._states.append(_state_json(history[len(self._states)]))
        states = self._states[: max(0, len(history) - 1)]
        if history and run.state is not None:
            states = [*states, _state_json(run.state, with_data=True)]
        return (
            f'{self._head},"name":{_json_str(run.name)},"parameters":{self._parameters},'
            f'"tags":{self._tags},"run_count":{run.run_count},'
            f'"start_time":{_json_time(run.start_time)},"end_time":{_json_time(run.end_time)},'
            f'"state_history":[{",".join(states)}]}}'
        )


_channels: weakref.WeakKeyDictionary[RedisStore, RecordChannel] = weakref.WeakKeyDictionary()


def _channel_for(store: RedisStore) -> RecordChannel:
    """One channel per store, so each thread keeps one connection for its run records."""
    channel = _channels.get(store)
    if channel is None:
        channel = _channels.setdefault(store, RecordChannel(store.client))
    return channel


def state_info(run: TaskRun, state: State) -> dict[str, Any]:
    """What ``AsyncResult(id).info`` shows while the run is in ``state``."""
    scheduled = state.scheduled_time.isoformat() if state.scheduled_time is not None else None
    return {
        "engine_state": state.name,
        "run_count": run.run_count,
        "message": state.message,
        "scheduled_time": scheduled,
    }


def save_run_with_meta(
    app: Celery, store: ResultStore, run: TaskRun, status: str, result: Any
) -> None:
    """Save a run that never reaches a worker, with its final backend state (one round trip).

    Used for runs answered at send time; Celery's result readers see ``status`` and ``result``.
    """
    from celery_taskengine.redis_store import RedisStore

    if not isinstance(store, RedisStore):
        store.save_run(run)
        return
    backend = app.backend
    meta = _meta(run.id, status, result, date_done=utcnow().isoformat())
    pipe = store.client.pipeline(transaction=False)
    document = _ENCODER.encode(run.to_document())
    pipe.set(store.key_for("run", run.id), document, px=_px_int(store.run_expires))
    pipe.set(backend.get_key_for_task(run.id), backend.encode(meta), px=_px_int(backend.expires))
    pipe.execute()


def _state_json(state: State, *, with_data: bool = False) -> str:
    """``_state_to_dict(state)`` as JSON, written directly: this runs several times per run."""
    if with_data and state.data is not None:
        return _ENCODER.encode(_state_to_dict(state, with_data=True))
    message = "null" if state.message is None else _json_str(state.message)
    scheduled = _json_time(state.scheduled_time)
    return (
        f'{{"type":"{state.type.value}","name":{_json_str(state.name)},'
        f'"message":{message},"timestamp":"{state.timestamp.isoformat()}",'
        f'"scheduled_time":{scheduled}}}'
    )


def _json_time(moment: datetime | None) -> str:
    return "null" if moment is None else f'"{moment.isoformat()}"'


def _plain_json(backend: Any) -> bool:
    """Whether the backend stores plain JSON (so our own encoder gives what it would)."""
    return backend.serializer == "json" and not getattr(backend, "compression", None)


def _meta(
    task_id: str, status: str, result: Any, *, date_done: str | None = None
) -> dict[str, Any]:
    # The shape Celery's backends store (backends/base.py _get_result_meta).
    return {
        "status": status,
        "result": result,
        "traceback": None,
        "children": [],
        "date_done": date_done,
        "task_id": task_id,
    }


def _px(seconds: float | None) -> str:
    """Milliseconds for a Lua script's PX argument; ``"0"`` means no expiry."""
    return str(_px_int(seconds) or 0)


def _px_int(seconds: float | None) -> int | None:
    """Milliseconds for redis-py's ``px=``; ``None`` means no expiry."""
    if not seconds or seconds <= 0:
        return None
    return max(1, math.ceil(seconds * 1000))
