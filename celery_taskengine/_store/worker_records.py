"""Recording a worker run's states: the run record, the backend's task state, and events.

Every state change of a run in a worker is persisted (so ``get_task_run(id)`` works anywhere
and a redelivery can continue the run), shown in the result backend (see
:mod:`~celery_taskengine._store.task_meta`) and, if it has no Celery twin, announced as a task
event.
Recording is on every task's hot path, so it costs as little as it can (see
:mod:`~celery_taskengine._store.record_channel` for how):

- Pending is held back and written together with Running; a plain run writes twice, at Running
  and at its final state, each a single send that does not wait for Redis to answer. Their
  replies are read (or, riding on Celery's connection, Celery's reply is) before Celery
  stores the task's result, so a write Redis never took or refused is never passed over.
- The backend's task state is written only for states Celery does not write itself.
- AwaitingRetry is written blocking: the retry's delivery, maybe on another worker, reads it.
- A crash never overwrites a run that already ended: with ``revoke(terminate=True)`` the
  worker's main process records Cancelled while the killed attempt records its crash.
- A final state is written when the delivery's engine returns (:meth:`DeliveryRecorder.flush`),
  not when it is entered: the run's transaction commits after Completed is entered (as in
  Prefect), and a worker killed in between must leave the run Running, to be continued, not
  Completed with its result never committed.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._store.claims import Claim
from celery_taskengine._store.record_channel import RecordChannel
from celery_taskengine._store.retrying import patience_from_policy
from celery_taskengine._store.run_document import RunDocument
from celery_taskengine._store.run_index import INDEX_LUA
from celery_taskengine._store.selection import configured_store_url
from celery_taskengine._store.task_meta import (
    SET_META_LUA,
    celery_status,
    encode_meta,
    keeps_meta_on_redis,
    px,
    state_info,
)
from celery_taskengine.states import State, StateType

if TYPE_CHECKING:
    from celery import Celery

    from celery_taskengine._store.redis_store import RedisStore

__all__ = ["Delivery", "DeliveryRecorder", "resend_orphaned_records", "retry_patience"]

logger = logging.getLogger(__name__)

#: Seconds the end of a delivery waits for Redis to take records its connection lost.
ORPHAN_PATIENCE_SECONDS = 10.0

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


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the bridge needs of Celery's request, read once in the delivery's own thread."""

    task_id: str
    workflow_id: str  #: RUN_ID keys use it (see worker_run._workflow_id)
    hostname: str | None
    retries: int
    redelivered: bool
    send_events: bool
    #: Records may ride on Celery's next backend command (see record_channel).
    piggyback: bool = False
    #: This delivery's claim on its message (see claims): every record write is fenced by
    #: it; a first delivery takes it with its Running record.
    claim: Claim | None = None
    #: Celery keeps no result of this delivery (``ignore_result``): no engine state either.
    ignores_result: bool = False

    @property
    def may_continue(self) -> bool:
        """Whether a record of the run may exist already: a retry, a redelivery, or a message
        another delivery may have run first (one claimed with a round trip)."""
        claim = self.claim
        return bool(self.retries or self.redelivered or (claim and claim.assumed_at is None))


class DeliveryRecorder:
    """The ``record`` callback of a worker run on a Redis store (see the module docstring)."""

    def __init__(
        self,
        app: Celery,
        store: RedisStore,
        delivery: Delivery,
    ) -> None:
        self.app = app
        self.store = store
        self.delivery = delivery
        self._channel = _channel_for(store, app)
        #: This delivery's writes on an engine connection, unless they ride on Celery's.
        self._writer = None if delivery.piggyback else self._channel.writer(delivery.task_id)
        self._run_key = store.key_for("run", delivery.task_id)
        self._run_px = px(store.run_expires)
        self._document: RunDocument | None = None
        #: No backend meta can exist before a message's first delivery starts.
        self._meta_is_new = not delivery.may_continue
        #: The backend's engine states ride with the records when Celery keeps its meta on
        #: the store's own Redis; else they go through Celery (never for ignored results).
        self._meta_rides_along = (
            keeps_meta_on_redis(app.backend) and configured_store_url(app) is None
        )
        self._shows_meta = not delivery.ignores_result
        #: The final state's writes, sent by flush() (see the module docstring).
        self._final: list[tuple[Any, ...]] | None = None

    def __call__(self, run: TaskRun, state: State) -> None:
        if state.name == "Pending" and len(run.state_history) == 1:
            return  # held back: written with Running
        claim = self.delivery.claim
        if claim is not None and claim.lost:
            return  # another delivery has the run: nothing of this attempt is written
        if self._document is None:
            self._document = RunDocument(run)
        settles = state.is_scheduled() or (state.is_final() and not state.is_crashed())
        save = self._save_command(state, self._document.encode(run), settles=settles)
        piggyback = self.delivery.piggyback
        if state.is_scheduled():
            if claim is None or claim.confirm():
                self._send_confirmed([save, self._index_command(run)], piggyback)
        else:
            commands = [save, self._index_command(run)]
            status = celery_status(state) if self._shows_meta else None
            if status is not None and self._meta_rides_along:
                commands.append(self._meta_command(run, state, status))
            elif status is not None:
                self._show_through_celery(run, state, status)
            if settles:
                self._final = commands
            else:
                self._send(commands, hold=state.type is StateType.RUNNING)

    def flush(self) -> None:
        """Write the final state, once the engine has returned (its transaction is over), and
        only while the delivery still holds its claim; see Redis take this delivery's writes:
        before Celery stores the task's result.

        Raises :class:`StoreUnavailableError` (logged with the run id) if Redis did not take
        them within Celery's backend retry policy, or refused one.
        """
        final, self._final = self._final, None
        claim = self.delivery.claim
        if final is not None and claim is not None and not claim.confirm():
            final = None  # another delivery has the run (logged by the claim)
        if self._writer is None:  # riding on Celery's connection: its reply confirms them
            if final is not None:
                self._channel.send(*final, key=self._run_key, piggyback=True)
            return
        if final is not None:
            self._writer.send(final)
        self._writer.confirm()

    def _send(self, commands: list[tuple[Any, ...]], *, hold: bool) -> None:
        """Send without waiting; ``hold``: an attempt's start may travel with its end."""
        if self._writer is None:
            self._channel.send(*commands, key=self._run_key, piggyback=True)
        else:
            self._writer.send(commands, hold=hold)

    def _send_confirmed(self, commands: list[tuple[Any, ...]], piggyback: bool) -> None:
        """Send and see Redis take them (after this delivery's earlier writes)."""
        if self._writer is None:
            self._channel.send_blocking(*commands, key=self._run_key, piggyback=piggyback)
        else:
            self._writer.send(commands)
            self._writer.confirm()

    def _index_command(self, run: TaskRun) -> tuple[Any, ...]:
        """The run index's update for ``run`` as it is now (see run_index)."""
        keys, args = self.store.index_keys_and_args(run)
        return ("EVAL", INDEX_LUA, len(keys), *keys, *args)

    def _show_through_celery(self, run: TaskRun, state: State, status: str) -> None:
        """The engine state in a backend the records do not ride to (rpc://, a database)."""
        try:
            self.app.backend.store_result(self.delivery.task_id, state_info(run, state), status)
        except Exception:  # the run goes on: the backend's view is a courtesy
            logger.warning("%s: could not show %s in the backend", self.delivery.task_id, status)

    def _save_command(self, state: State, document: str, *, settles: bool) -> tuple[Any, ...]:
        """The write of the run record: fenced by the claim (and settling it, for an outcome),
        except a crash's, which never overwrites a run that already ended."""
        key, px, claim = self._run_key, self._run_px, self.delivery.claim
        if state.is_crashed():
            return ("EVAL", _SAVE_UNLESS_ENDED_LUA, 1, key, document, px)
        if claim is not None:
            return claim.record_command(key, document, px, settle=settles)
        return ("SET", key, document) if px == "0" else ("SET", key, document, "PX", px)

    def _meta_command(self, run: TaskRun, state: State, status: str) -> tuple[Any, ...]:
        backend = self.app.backend
        encoded = encode_meta(backend, self.delivery.task_id, status, state_info(run, state))
        key = backend.get_key_for_task(self.delivery.task_id)
        ttl = px(backend.expires)
        if self._meta_is_new:  # nothing to protect: a plain SET NX is enough (and cheaper)
            self._meta_is_new = False
            if ttl == "0":
                return ("SET", key, encoded, "NX")
            return ("SET", key, encoded, "PX", ttl, "NX")
        return ("EVAL", SET_META_LUA, 1, key, encoded, ttl, "")


_channels: weakref.WeakKeyDictionary[RedisStore, RecordChannel] = weakref.WeakKeyDictionary()


def resend_orphaned_records() -> None:
    """At a delivery's end: write again the records a dropped connection lost (see
    record_channel), so a run whose result Celery stored does not end without its record."""
    if not RecordChannel.orphaned:
        return
    for channel in list(_channels.values()):
        if channel.has_orphans:
            channel.resend_orphans(patience=ORPHAN_PATIENCE_SECONDS)
    RecordChannel.orphaned = any(channel.has_orphans for channel in list(_channels.values()))


def _channel_for(store: RedisStore, app: Celery) -> RecordChannel:
    """One channel per store, so each thread keeps one connection for its run records."""
    channel = _channels.get(store)
    if channel is None:
        patience = retry_patience(app)
        channel = RecordChannel(store.client, patience=patience, pool=store.connections)
        channel = _channels.setdefault(store, channel)
    return channel


def retry_patience(app: Celery) -> float:
    """How long Celery's Redis backend retries a write while Redis is down (its
    ``retry_policy``): records wait as long as every other store operation does."""
    return patience_from_policy(getattr(app.backend, "retry_policy", None)).seconds
