"""Recording a worker run's states on a Redis store: the run record, its claim and its meta.

Every state change of a run in a worker is persisted (so ``get_task_run(id)`` works anywhere
and a redelivery can continue the run) by observers (see
:mod:`~celery_taskengine._engine.observers`): :class:`ClaimKeeping` (nothing is written
once the delivery lost its claim), :class:`RunRecords` (the record and its index entry, and the
sending of the state's batch) and :class:`~._store.task_meta_observer.TaskMetaShown` (Celery's
task meta, riding in the same batch). Recording is on every task's hot path, so it costs as
little as it can (see :mod:`~celery_taskengine._store.record_channel` for how):

- Pending is held back and written together with Running; a plain run writes twice, at Running
  and at its final state, each a single send that does not wait for Redis to answer. Their
  replies are read (or, riding on Celery's connection, Celery's reply is) before Celery
  stores the task's result, so a write Redis never took or refused is never passed over.
- The backend's task state is written only for states Celery does not write itself.
- AwaitingRetry is written blocking: the retry's delivery, maybe on another worker, reads it.
- A crash never overwrites a run that already ended: with ``revoke(terminate=True)`` the
  worker's main process records Cancelled while the killed attempt records its crash.
- A final state is written when the delivery's engine returns (``RunObservers.end``), not
  when it is entered: the run's transaction commits after Completed is entered (as in
  Prefect), and a worker killed in between must leave the run Running, to be continued, not
  Completed with its result never committed.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery_taskengine._engine.observers import RunObserver, StateWrites
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._store.claims import Claim
from celery_taskengine._store.record_channel import RecordChannel
from celery_taskengine._store.retrying import patience_from_policy
from celery_taskengine._store.run_document import RunDocument
from celery_taskengine._store.run_index import INDEX_FN, index_call
from celery_taskengine._store.task_meta import px
from celery_taskengine._store.task_meta_observer import TaskMetaShown
from celery_taskengine.states import State, StateType

if TYPE_CHECKING:
    from celery import Celery

    from celery_taskengine._store.redis_store import RedisStore

__all__ = [
    "ClaimKeeping",
    "Delivery",
    "RunRecords",
    "delivery_observers",
    "resend_orphaned_records",
    "retry_patience",
]

#: Seconds the end of a delivery waits for Redis to take records its connection lost.
ORPHAN_PATIENCE_SECONDS = 10.0

# The run record (KEYS[1]: ARGV[1], living ARGV[2] ms, '0' for ever), then its index entry.
_SAVE = (
    """
if ARGV[2] ~= '0' then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
else redis.call('set', KEYS[1], ARGV[1]) end
"""
    + index_call(2, 3)
    + "return 1\n"
)
#: A run record and its index entry, for a delivery without a claim. KEYS: run, then the
#: index's. ARGV: document, px ('0' for none), then the index's.
_SAVE_LUA = INDEX_FN + _SAVE
#: Saves a run unless its stored record already ended: a crash seen while the worker's main
#: process records a revoke (``terminate=True`` kills the attempt) must not undo the Cancelled.
#: KEYS and ARGV as _SAVE_LUA's.
_SAVE_UNLESS_ENDED_LUA = (
    INDEX_FN
    + """
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
"""
    + _SAVE
)


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the bridge needs of Celery's request, read once in the delivery's own thread."""

    task_id: str
    workflow_id: str  #: RUN_ID keys use it (see worker_delivery._workflow_id)
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
    #: The message stays with the broker until the delivery ends (``acks_late``): a
    #: redelivery after a crash must find the attempt's Running record.
    acks_late: bool = False
    #: Celery stores the outcome right after the delivery returns (a function's or a
    #: coroutine's, kept, not eager, acknowledged early): its record may commit with it.
    result_follows: bool = False
    #: Celery's request object: a backend that routes states by it (``rpc://``) is given it,
    #: since states may be stored from a thread Celery's ``current_task`` does not reach.
    request: Any = None

    @property
    def may_continue(self) -> bool:
        """Whether a record of the run may exist already: a retry, a redelivery, or a message
        another delivery may have run first (one claimed with a round trip)."""
        claim = self.claim
        return bool(self.retries or self.redelivered or (claim and claim.assumed_at is None))


class ClaimKeeping(RunObserver):
    """Nothing of an attempt is written once its delivery lost its claim; an outcome (a retry's
    AwaitingRetry, the final state) only after asking whether the claim still holds."""

    __slots__ = ("claim",)

    def __init__(self, claim: Claim) -> None:
        self.claim = claim

    def on_state(self, run: TaskRun, state: State, batch: StateWrites) -> None:
        if self.claim.lost or (state.is_scheduled() and not self.claim.confirm()):
            batch.drop()  # another delivery has the run (logged by the claim)

    def on_end(self, run: TaskRun, batch: StateWrites) -> None:
        if batch.commands and not self.claim.confirm():
            batch.drop()


class RunRecords(RunObserver):
    """The run record and its index entry of a worker run on a Redis store, and the sending
    of every observer's commands for a state (see the module docstring)."""

    def __init__(self, app: Celery, store: RedisStore, delivery: Delivery) -> None:
        self.store = store
        self.delivery = delivery
        self._channel = _channel_for(store, app)
        #: This delivery's writes on an engine connection, unless they ride on Celery's.
        self._writer = None if delivery.piggyback else self._channel.writer(delivery.task_id)
        self._run_key = store.key_for("run", delivery.task_id)
        self._run_px = px(store.run_expires)
        self._document: RunDocument | None = None

    def on_state(self, run: TaskRun, state: State, batch: StateWrites) -> None:
        if batch.dropped or (state.name == "Pending" and len(run.state_history) == 1):
            return  # lost, or held back: written with Running
        if self._document is None:
            self._document = RunDocument(run)
        settles = state.is_scheduled() or (state.is_final() and not state.is_crashed())
        batch.add(self._save_command(run, state, self._document.encode(run), settles=settles))
        if state.is_scheduled():
            batch.send = self._send_confirmed  # the retry's delivery reads it
        elif settles:
            batch.held = True  # written by on_end, once the transaction is over
        elif state.type is StateType.RUNNING:
            batch.send = self._send_with_end  # an attempt's start may travel with its end
        else:
            batch.send = self._send

    def on_end(self, run: TaskRun, batch: StateWrites) -> None:
        batch.send = self._flush

    def _flush(self, batch: StateWrites) -> None:
        """Write the final state (unless its claim was lost); see Redis take this delivery's
        writes before Celery stores the task's result.

        Raises :class:`StoreUnavailableError` (logged with the run id) if Redis did not take
        them within Celery's backend retry policy, or refused one.
        """
        waits = self._wait_for_replicas(batch)
        if self._writer is None:  # riding on Celery's connection: its reply confirms them
            if waits:  # made before Celery's result, which a failover must not overtake
                self._channel.send_blocking(*batch.commands, key=self._run_key, piggyback=True)
            elif batch.commands:
                self._channel.send(*batch.commands, key=self._run_key, piggyback=True)
            return
        if batch.commands:
            self._writer.send(batch.commands)
        self._writer.confirm()

    def _wait_for_replicas(self, batch: StateWrites) -> bool:
        """An outcome's writes count as made once a replica has them (see replicas): a
        failover must not lose the record of a run whose result the caller got. Whether
        the batch waits for one."""
        if batch.commands and not batch.dropped:
            wait = self.store.replica_wait()
            if wait is not None:
                batch.add(wait)
                return True
        return False

    def _send(self, batch: StateWrites, *, hold: bool = False) -> None:
        """Send without waiting."""
        if batch.dropped:
            return
        if self._writer is None:
            self._channel.send(*batch.commands, key=self._run_key, piggyback=True)
        else:
            self._writer.send(batch.commands, hold=hold)

    def _send_with_end(self, batch: StateWrites) -> None:
        self._send(batch, hold=True)

    def _send_confirmed(self, batch: StateWrites) -> None:
        """Send and see Redis take them (after this delivery's earlier writes)."""
        if batch.dropped:
            return
        self._wait_for_replicas(batch)
        if self._writer is None:
            piggyback = self.delivery.piggyback
            self._channel.send_blocking(*batch.commands, key=self._run_key, piggyback=piggyback)
        else:
            self._writer.send(batch.commands)
            self._writer.confirm()

    def _save_command(
        self, run: TaskRun, state: State, document: str, *, settles: bool
    ) -> tuple[Any, ...]:
        """The write of the run record with its index entry (see run_index), one script call:
        fenced by the claim (and settling it, for an outcome), except a crash's, which never
        overwrites a run that already ended."""
        key, px, claim = self._run_key, self._run_px, self.delivery.claim
        index = self.store.index_keys_and_args(run)
        if claim is not None and not state.is_crashed():
            return claim.record_command(key, document, px, settle=settles, index=index)
        script = _SAVE_UNLESS_ENDED_LUA if state.is_crashed() else _SAVE_LUA
        keys, args = index
        return ("EVAL", script, 1 + len(keys), key, *keys, document, px, *args)


def delivery_observers(app: Celery, store: RedisStore, delivery: Delivery) -> list[RunObserver]:
    """How a worker delivery's run is recorded on a Redis store: claim first (it may drop a
    state's writes), then the run record (which sends the batch), then Celery's task meta."""
    claim = delivery.claim
    keeping: list[RunObserver] = [ClaimKeeping(claim)] if claim is not None else []
    return [*keeping, RunRecords(app, store, delivery), TaskMetaShown(app, delivery)]


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
