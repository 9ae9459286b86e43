"""Recording local runs on the shared store without making the caller wait for Redis.

A local run (``t(...)`` in a producer or a script) on an app with a Redis result backend must be
visible to ``get_task_run`` from other processes, but a round trip per state would cost a local
run far more than the run itself: a cache hit would cost three round trips instead of one. So
the live run object is kept in this process's memory store, where same-process reads find it at
once, and its document is written to Redis at the states other processes care about (the first
Running, AwaitingRetry, and the final state) behind the caller: the flusher thread
(:mod:`~._store.local_flush`) comes within ``WRITE_BEHIND_SECONDS``, or
:func:`flush_local_records` does, and sends every record held then in one script call
(:mod:`~._store.record_batch`) on a connection the recorder keeps (from the store's engine pool).

Every write's reply is read, by the flusher, not the caller: a write counts as made only when
Redis answered it. An error reply (OOM, NOPERM, READONLY) loses that run's record, and so does
an outage longer than Celery would wait out; either way the run id is logged and the next
:func:`flush_local_records` returns a false :class:`~._store.local_flush.FlushResult` naming it.
A process killed with SIGKILL loses the records of the runs that ended in its last 10 ms or so;
normal exits flush, also a ``multiprocessing`` child's.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import redis

from celery_taskengine._engine.observers import RunObserver, StateWrites
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._store.local_flush import Flusher, FlushResult, Recorder
from celery_taskengine._store.memory import default_memory_store
from celery_taskengine._store.protocol import SHARED_STATES
from celery_taskengine._store.record_batch import MAX_RUNS_PER_BATCH, Batch
from celery_taskengine._store.run_document import RunDocument
from celery_taskengine._store.task_meta import px
from celery_taskengine._store.wire import (
    DOWN,
    MSG_MORE,
    PING_PACKED,
    dropped,
    pack,
    read_reply,
    refusal,
    send,
)
from celery_taskengine.states import State, StateType

if TYPE_CHECKING:
    from celery_taskengine._store.redis_store import RedisStore

__all__ = ["FlushResult", "LocalRunRecorder", "flush_local_records", "recorder_for"]

logger = logging.getLogger(__name__)

#: How long ``flush_run_records`` waits by default.
FLUSH_TIMEOUT_SECONDS = 5.0
#: Documents kept for runs between Running and their end; more means runs that died unended.
_MAX_OPEN_DOCUMENTS = 10_000
#: Seconds unanswered records are kept and retried while Redis cannot be reached before they
#: count as lost: as long as Celery's Redis backend retries a write by default (20 tries at
#: most 1 s apart), so an outage Celery waits out loses no local record either.
OUTAGE_PATIENCE_SECONDS = 20.0
#: Lost run ids kept for the next flush_run_records (beyond that they are only counted).
_MAX_LOST_NAMED = 10_000


class LocalRunRecorder(RunObserver):
    """The ``record`` callback of local runs on a Redis store.

    A record is not written when its state is entered but held (the run's latest state
    replaces an older one), and written by the flusher thread after
    :data:`~._store.local_flush.WRITE_BEHIND_SECONDS`, with every other record held then, in
    one script call. A cache hit's Running and Cached are one record, and a run's Running is
    written only if it is still running when the flusher comes. A run's thread only holds
    records: encoding, sending and reading replies are the flusher's, so the run never waits
    for Redis nor spends its time on the writing.

    Until its reply arrived, the batch that carries each run's last write is kept, and sent
    again (with the batches before it, in order) on a new connection if the old one is found
    dropped.
    """

    writes_batch = False  # its records go behind the caller, on their own

    def __init__(self, store: RedisStore) -> None:
        # Not the store itself: the registry below forgets a recorder with its store.
        self._client = store.client
        self._pool = store.connections
        self._run_key_prefix = store.key_for("run", "")
        self._index = store.run_index
        self._memory = default_memory_store()
        self._px = px(store.run_expires)
        #: Each open run's document, so a state already entered is encoded once.
        self._documents: dict[str, RunDocument] = {}
        #: Runs whose latest state is not written yet, by id.
        self._held: dict[str, TaskRun] = {}
        #: Whether the flusher will visit this recorder (see local_flush.Flusher).
        self.due = False
        self._lock = threading.Lock()  #: held while encoding, sending and reading replies
        #: Kept from the store's engine pool; None until first used and in a forked child.
        self._connection: Any = None
        #: Batches sent on the connection whose replies are not read yet, in order.
        self._sent: collections.deque[Batch] = collections.deque()
        #: The batch carrying each record's last write until Redis answered it (by record key).
        self._unconfirmed: dict[str, Batch] = {}
        self._batches_made = 0
        #: Runs whose records were given up on since the last flush, and how many.
        self._lost: dict[str, None] = {}
        self._lost_count = 0
        #: When Redis was first found unreachable in the current outage (monotonic seconds).
        self._down_since: float | None = None
        #: The last reason Redis could not be reached (shown with unconfirmed records).
        self._last_error: BaseException | None = None

    def on_state(self, run: TaskRun, state: State, batch: StateWrites) -> None:
        self(run, state)

    def __call__(self, run: TaskRun, state: State) -> None:
        kind = state.type
        if kind is StateType.PENDING:
            self._memory.save_run(run)
            return
        first_running = kind is StateType.RUNNING and run.run_count == 1
        if not first_running and kind not in SHARED_STATES:
            return
        self._held[run.id] = run
        if not self.due:
            _flusher.schedule(self)

    def start_afresh(self) -> None:
        """In a forked child: new lock, nothing held, no connection (the parent's stays open
        for the parent)."""
        self._lock = threading.Lock()
        self._held.clear()
        self._sent.clear()
        self._unconfirmed.clear()
        self._connection = None
        self.due = False

    def write_held(self) -> None:
        """Send the held records now, a batch (one script call) at a time, without waiting
        for Redis (:meth:`confirm_sent` reads the replies).

        Encoding and sending happen under one lock, so a run's later state is always sent
        after its earlier one. Between batches the GIL is let go: a run's thread back from
        Redis takes it then, not when this thread has written everything.
        """
        with self._lock:
            held = list(self._held)
            for start in range(0, len(held), MAX_RUNS_PER_BATCH):
                if start:
                    time.sleep(0)
                records = self._encode(held[start : start + MAX_RUNS_PER_BATCH])
                if records:
                    batch = Batch(self._batches_made, self._index, records, self._px)
                    self._batches_made += 1
                    self._send([batch])

    def _encode(self, run_ids: list[str]) -> list[tuple[str, str, TaskRun]]:
        """The records of the held runs ``run_ids`` (no longer held), as (key, document, run)."""
        records: list[tuple[str, str, TaskRun]] = []
        for run_id in run_ids:
            run = self._held.pop(run_id, None)
            if run is None:
                continue
            key = self._run_key_prefix + run_id
            try:
                records.append((key, self._document(run), run))
            except Exception as exc:  # a result that cannot be shown loses its record only
                self._lose(key, exc)
        return records

    def confirm_sent(self, timeout: float, *, patience: float = OUTAGE_PATIENCE_SECONDS) -> bool:
        """Read the replies to what was sent (pushed with a PING), waiting up to ``timeout``
        seconds for the first; whether nothing sent is left unconfirmed.

        Writes a dropped connection left unanswered are sent again on a new one; while Redis
        stays unreachable they are kept, for the flusher to try again, until ``patience``
        seconds have passed: then they are given up on (logged, reported by the next flush).
        """
        with self._lock:
            try:
                self._confirm(timeout)
            except DOWN as exc:
                return self._still_down(exc, patience)
            self._down_since = None
            return True

    def flush(self, timeout: float, *, patience: float = OUTAGE_PATIENCE_SECONDS) -> FlushResult:
        """Write what is held, wait until Redis answered it; the records lost since the last
        flush, and those still unconfirmed (false if any: the flusher goes on trying those)."""
        self.write_held()
        confirmed = self.confirm_sent(timeout, patience=patience)
        with self._lock:
            lost, count = tuple(self._lost), self._lost_count
            self._lost, self._lost_count = {}, 0
            start = len(self._run_key_prefix)
            waiting = () if confirmed else tuple(key[start:] for key in self._unconfirmed)
        if waiting:
            cause = self._last_error  # why Redis has not answered, if it failed to
            logger.warning(
                "%s: run records not confirmed by Redis yet", ", ".join(waiting), exc_info=cause
            )
            _flusher.retry_later(self)
        return FlushResult(lost + waiting, count + len(waiting))

    def _confirm(self, timeout: float) -> None:
        for attempt in (1, 2):
            if not self._unconfirmed and not self._sent:
                return
            try:
                connection = self._connect()
                if connection is None:  # every engine connection is busy: write blocking
                    self._write_blocking(self._unconfirmed_batches())
                    return
                send(connection, PING_PACKED)
                self._read_replies(connection, timeout)
                return
            except DOWN:
                self._forget_connection()
                if attempt == 2:
                    raise

    def _still_down(self, exc: Exception, patience: float) -> bool:
        """Redis could not be reached: keep the unconfirmed writes (``False``) until it has
        been so for ``patience`` seconds, then give them up (``True``: nothing left)."""
        now = time.monotonic()
        self._last_error = exc
        if self._down_since is None:
            self._down_since = now
        if now - self._down_since < patience:
            return False
        for key in list(self._unconfirmed):
            self._lose(key, exc)
        self._unconfirmed.clear()
        self._down_since = None
        return True

    def _document(self, run: TaskRun) -> str:
        documents = self._documents
        document = documents.get(run.id)
        if document is None:
            if len(documents) >= _MAX_OPEN_DOCUMENTS:  # runs that never ended (killed)
                documents.clear()
            document = documents[run.id] = RunDocument(run)
        if run.state is not None and run.state.is_final():
            del documents[run.id]
        return document.encode(run)

    def _send(self, batches: list[Batch]) -> None:
        """Send ``batches``, held back by the kernel (MSG_MORE) for the PING that follows;
        a failed send is made once more on a new connection, then left to the flusher."""
        for _ in (1, 2):
            try:
                connection = self._connect()
                if connection is None:
                    break  # the flusher writes them blocking (see confirm_sent)
                send(connection, pack(connection, [b.command for b in batches]), MSG_MORE)
            except DOWN:
                self._forget_connection()
                continue
            self._sent.extend(batches)
            break
        for batch in batches:  # unsent ones go with the next connection
            self._unconfirmed.update(dict.fromkeys(batch.keys, batch))

    def _unconfirmed_batches(self) -> list[Batch]:
        """The batches still carrying a record's last write, in the order they were made."""
        unique = {id(batch): batch for batch in self._unconfirmed.values()}
        return sorted(unique.values(), key=lambda batch: batch.seq)

    def _settle(self, batch: Batch, error: BaseException | None) -> None:
        """Redis answered ``batch``: its records are written, or lost with ``error``
        (unless a later batch carries them)."""
        unconfirmed = self._unconfirmed
        for key in batch.keys:
            if unconfirmed.get(key) is batch:
                del unconfirmed[key]
                if error is not None:
                    self._lose(key, error)

    def _read_replies(self, connection: Any, timeout: float) -> None:
        """Read the reply of every batch sent, then the PING's; an error reply loses that
        batch's run records, a failure to read raises (the rest stay unconfirmed)."""
        sent = self._sent
        wait: float | None = timeout  # for the first reply only: the rest follow it
        while sent:
            error = None
            try:
                read_reply(connection, wait)
            except redis.exceptions.ResponseError as exc:
                error = exc
            wait = None
            self._settle(sent.popleft(), error)
        read_reply(connection, wait)

    def _write_blocking(self, batches: list[Batch]) -> None:
        """Write ``batches`` through the client's pool, waiting for each reply."""
        pipe = self._client.pipeline(transaction=False)
        for batch in batches:
            pipe.execute_command(*batch.command)  # type: ignore[no-untyped-call]
        replies = pipe.execute(raise_on_error=False)
        for batch, reply in zip(batches, replies, strict=True):
            self._settle(batch, reply if isinstance(reply, Exception) else None)

    def _lose(self, key: str, exc: BaseException) -> None:
        run_id = key[len(self._run_key_prefix) :]
        logger.error("%s: the run record is not written to Redis: %s", run_id, refusal(exc))
        self._lost_count += 1
        if len(self._lost) < _MAX_LOST_NAMED:
            self._lost[run_id] = None

    def _connect(self) -> Any:
        """The recorder's connection, up (``None`` if the engine pool has none to spare).
        On a new one, the writes the old one left unanswered are sent first."""
        connection = self._connection
        if connection is not None and connection._sock is not None:
            # Unread replies make a live connection look dropped: reading them tells.
            if self._sent or not dropped(connection):
                return connection
            self._forget_connection()
        if self._connection is None:
            self._connection = self._pool.take()
            if self._connection is None:
                return None
        connection = self._connection
        connection.connect()
        self._sent.clear()
        if self._unconfirmed:
            again = self._unconfirmed_batches()
            send(connection, pack(connection, [batch.command for batch in again]), MSG_MORE)
            self._sent.extend(again)
        return connection

    def _forget_connection(self) -> None:
        """Close the connection (kept, to be reconnected): its unread replies are gone."""
        if self._connection is not None:
            self._connection.disconnect()
        self._sent.clear()


def _all_recorders() -> list[Recorder]:
    with _registry_lock:
        return list(_recorders.values())


_flusher = Flusher(_all_recorders)
_recorders: weakref.WeakKeyDictionary[RedisStore, LocalRunRecorder] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def _start_afresh_in_child() -> None:
    """After a fork: the parent's flusher thread may have held a lock (the child would wait
    on it forever), and what the parent held is the parent's to write."""
    global _registry_lock
    _registry_lock = threading.Lock()
    _flusher.start_afresh()
    for recorder in list(_recorders.values()):
        recorder.start_afresh()


os.register_at_fork(after_in_child=_start_afresh_in_child)


def recorder_for(store: RedisStore) -> LocalRunRecorder:
    """The local-run recorder for ``store`` in this process (one per store)."""
    recorder = _recorders.get(store)
    if recorder is None:
        with _registry_lock:
            recorder = _recorders.setdefault(store, LocalRunRecorder(store))
    return recorder


def flush_local_records(
    store: object | None = None, timeout: float = FLUSH_TIMEOUT_SECONDS
) -> FlushResult:
    """Send this process's held local run records (only ``store``'s, if given) and wait until
    Redis answered them: before handing a run id to a process that must see it at once. False
    when a record did not reach Redis within ``timeout`` or was refused; ``lost_runs`` names them.
    """
    with _registry_lock:
        recorders = [r for held, r in _recorders.items() if store is None or held is store]
    deadline = time.monotonic() + timeout
    return FlushResult.combine(
        recorder.flush(max(0.0, deadline - time.monotonic())) for recorder in recorders
    )
