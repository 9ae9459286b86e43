"""Recording a worker run's states: the run record, the backend's task state, and events.

Every state change of a run in a worker is persisted (so ``get_task_run(id)`` works anywhere
and a redelivery can continue the run), shown in the result backend (``AsyncResult(id).state``
reads ``RUNNING``, ``RETRYING``, ``AWAITING_RETRY``, ...) and, if it has no Celery twin,
announced as a task event. Recording is on every task's hot path, so it costs as little Redis
as it can:

- Pending is held back and written together with Running, in one script that also refuses to
  overwrite a run record that already exists (a redelivered message whose run the bridge did not
  load first): a plain first delivery makes one round trip at Running and one at its final state.
- The backend's task state is written only for states Celery does not write itself (not for
  final Completed/Failed/Cancelled: Celery's trace stores SUCCESS/FAILURE/REVOKED right after),
  and never over a SUCCESS, FAILURE or REVOKED already there (checked inside Redis).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery_taskengine.events import send_state_event
from celery_taskengine.result_store import ResultStore
from celery_taskengine.states import State, StateType, utcnow
from celery_taskengine.task_run import TaskRun, run_from_document

if TYPE_CHECKING:
    from celery import Celery

    from celery_taskengine.redis_store import RedisStore

__all__ = [
    "Delivery",
    "DeliveryRecorder",
    "RunExists",
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
#: KEYS: run, meta. ARGV: run document, run px, meta ('' for none), meta px.
#: Returns the existing run document (nothing written), or nil once written.
_CREATE_RUN_LUA = (
    _SET_META_FN
    + """
local existing = redis.call('get', KEYS[1])
if existing then return existing end
if ARGV[2] ~= '0' then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
else redis.call('set', KEYS[1], ARGV[1]) end
if ARGV[3] ~= '' then set_meta(KEYS[2], ARGV[3], ARGV[4], '') end
return false
"""
)

_SNAKE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|[^A-Za-z0-9]+")
_ENCODER = json.JSONEncoder(separators=(",", ":"))


class RunExists(Exception):
    """Raised out of the engine when a run believed new already has a record: continue that."""

    def __init__(self, run: TaskRun) -> None:
        super().__init__(run.id)
        self.run = run


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the bridge needs of Celery's request, read once in the delivery's own thread."""

    task_id: str
    root_id: str
    hostname: str | None
    retries: int
    redelivered: bool
    send_events: bool


def celery_status(state: State) -> str | None:
    """The backend task state shown for ``state`` (``AwaitingRetry`` -> ``AWAITING_RETRY``).

    ``None`` for Pending and for final states Celery records itself (SUCCESS, FAILURE, REVOKED).
    """
    if state.name == "Pending" or (state.is_final() and not state.is_crashed()):
        return None
    return _SNAKE.sub("_", state.name).strip("_").upper()


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
        fresh: bool,
        on_attempt: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.store = store
        self.delivery = delivery
        self.on_attempt = on_attempt
        self._fresh = fresh
        self._run_key = store.key_for("run", delivery.task_id)
        self._run_px = _px(store.run_expires)
        self._run_px_int = _px_int(store.run_expires)

    def __call__(self, run: TaskRun, state: State) -> None:
        if self._fresh and state.name == "Pending" and len(run.state_history) == 1:
            return  # held back: written with Running, in one round trip
        status = celery_status(state)
        meta = None if status is None or state.is_scheduled() else self._encoded_meta(run, state)
        document = _ENCODER.encode(run.to_document())
        if self._fresh:
            self._fresh = False
            self._create(document, meta)
        elif meta is None:
            self.store.client.set(self._run_key, document, px=self._run_px_int)
        else:
            self._update(document, meta)
        if state.type is StateType.RUNNING and self.on_attempt is not None:
            self.on_attempt()
        if self.delivery.send_events:
            d = self.delivery
            send_state_event(self.app, d.hostname, d.task_id, run, state)

    def _create(self, document: str, meta: bytes | str | None) -> None:
        backend = self.app.backend
        keys = [self._run_key, backend.get_key_for_task(self.delivery.task_id)]
        args = [document, self._run_px, meta if meta is not None else "", _px(backend.expires)]
        existing = self.store.client.eval(_CREATE_RUN_LUA, 2, *keys, *args)
        if existing is None:
            return
        try:
            found = run_from_document(json.loads(existing))
        except ValueError as exc:
            logger.warning("%s: replacing a malformed run record: %s", self.delivery.task_id, exc)
            self.store.client.set(self._run_key, document, px=self._run_px_int)
            return
        raise RunExists(found)

    def _update(self, document: str, meta: bytes | str) -> None:
        backend = self.app.backend
        pipe = self.store.client.pipeline(transaction=False)
        pipe.set(self._run_key, document, px=self._run_px_int)
        meta_key = backend.get_key_for_task(self.delivery.task_id)
        pipe.eval(_SET_META_LUA, 1, meta_key, meta, _px(backend.expires), "")
        pipe.execute()

    def _encoded_meta(self, run: TaskRun, state: State) -> bytes | str:
        status = celery_status(state) or ""
        meta = _meta(self.delivery.task_id, status, state_info(run, state))
        encoded: bytes | str = self.app.backend.encode(meta)
        return encoded


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
