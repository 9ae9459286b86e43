"""Recording local runs on the shared store without making the caller wait for Redis.

A local run (``t(...)`` in a producer or a script) on an app with a Redis result backend must be
visible to ``get_task_run`` from other processes, but a round trip per state would cost a local
run far more than the run itself: a cache hit would cost three round trips instead of one. So
the live run object is kept in this process's memory store, where same-process reads find it at
once, and its document is written to Redis at the states other processes care about (the first
Running, AwaitingRetry, and the final state) as writes that wait for no answer
(``CLIENT REPLY SKIP``), on one connection per process and store, held back by the kernel
(``MSG_MORE``) until the flusher thread confirms them with a PING, within about 10 ms, or
:func:`flush_run_records` does.

Measured on the 2-core reference machine (``bench/cache_costs.py``): a send that wakes Redis
costs its caller about 30 µs (on loopback the sender's system call wakes the receiver); one
held back costs about 3 µs. A background thread that batched these writes through a script
cost a cache hit about 30 µs, and writes sent at once about as much; written while the next
hit's read travels, they cost it about 0 to 15 µs.

A process killed with SIGKILL (or leaving through ``os._exit``) loses the records of the runs
that ended in its last 10 ms or so; they stay Running on the backend until they expire.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from celery_taskengine._store.memory import default_memory_store
from celery_taskengine._store.run_document import RunDocument
from celery_taskengine._store.task_meta import px
from celery_taskengine._store.wire import (
    DOWN,
    MSG_MORE,
    PING_PACKED,
    SKIP,
    Command,
    dropped,
    pack,
    replies_can_be_skipped,
    send,
)
from celery_taskengine.states import State, StateType
from celery_taskengine.task_run import TaskRun

if TYPE_CHECKING:
    from celery import Celery

    from celery_taskengine._store.redis_store import RedisStore

__all__ = ["LocalRunRecorder", "flush_run_records", "recorder_for"]

logger = logging.getLogger(__name__)

#: How long ``flush_run_records`` waits by default.
FLUSH_TIMEOUT_SECONDS = 5.0
#: A record waits at most this long for a later one to be written with (see LocalRunRecorder).
WRITE_BEHIND_SECONDS = 0.01
#: How long the flusher waits for Redis to confirm what was sent.
CONFIRM_TIMEOUT_SECONDS = 5.0
#: Documents kept for runs between Running and their end; more means runs that died unended.
_MAX_OPEN_DOCUMENTS = 10_000

_WORTH_SHARING = frozenset(
    {
        StateType.SCHEDULED,
        StateType.COMPLETED,
        StateType.FAILED,
        StateType.CANCELLED,
        StateType.CRASHED,
    }
)


class LocalRunRecorder:
    """The ``record`` callback of local runs on a Redis store.

    A record is not written when its state is entered but held (the run's latest state
    replaces an older one), and written with the next run's Running record, which a cache
    hit makes while its read is on the way to Redis and back, so the writing costs the caller
    no time; or by the flusher thread after :data:`WRITE_BEHIND_SECONDS`, whichever comes
    first. A cache hit's Running and Cached are one record, and a run's Running is written
    only if it is still running when the flusher comes. A run's thread never waits for Redis:
    if the connection is down or busy, it leaves the writing to the flusher.

    Writes are sent without waiting for answers; the flusher confirms them with a PING. Until
    then each run's last write is kept, and sent again if the connection is found dropped.
    """

    def __init__(self, store: RedisStore) -> None:
        # Not the store itself: the registry below forgets a recorder with its store.
        self._client = store.client
        self._run_key_prefix = store.key_for("run", "")
        self._memory = default_memory_store()
        self._px = px(store.run_expires)
        #: Each open run's document, so a state already entered is encoded once.
        self._documents: dict[str, RunDocument] = {}
        #: Runs whose latest state is not written yet, by id.
        self._held: dict[str, TaskRun] = {}
        #: Whether the flusher will visit this recorder (see _Flusher).
        self.due = False
        self._lock = threading.Lock()  #: held while encoding and sending (see write_held)
        #: None until first used and in a forked child (see start_afresh).
        self._connection: Any = None
        #: Whether the server honours CLIENT REPLY SKIP; if not, records are written blocking.
        self._skips_replies: bool | None = None
        #: Each run's last write since Redis last confirmed this connection (by record key).
        self._unconfirmed: dict[str, Command] = {}
        #: Records given up on since the last flush_run_records.
        self._lost = 0

    def __call__(self, run: TaskRun, state: State) -> None:
        kind = state.type
        if kind is StateType.PENDING:
            self._memory.save_run(run)
            return
        first_running = kind is StateType.RUNNING and run.run_count == 1
        if not first_running and kind not in _WORTH_SHARING:
            return
        if first_running and self._held:
            self.write_held(but=run.id, may_connect=False)
        self._held[run.id] = run
        if not self.due:
            _flusher.schedule(self)

    def start_afresh(self) -> None:
        """In a forked child: new lock, nothing held, no connection (the parent's stays open
        for the parent)."""
        self._lock = threading.Lock()
        self._held.clear()
        self._unconfirmed.clear()
        self._connection = None
        self.due = False

    def write_held(self, but: str | None = None, *, may_connect: bool = True) -> None:
        """Write the held records (except run ``but``'s) now, without waiting for Redis.

        Encoding and sending happen under one lock, so a run's later state is always sent
        after its earlier one. Without ``may_connect`` (a run's own thread) nothing is written
        unless the connection is up and free: the flusher thread writes it instead.
        """
        if not self._lock.acquire(blocking=may_connect):
            return
        try:
            if not may_connect and not self._connected():
                return
            held = self._held
            commands: dict[str, Command] = {}
            for run_id in list(held):
                run = held.pop(run_id, None) if run_id != but else None
                if run is None:
                    continue
                try:
                    key = self._run_key_prefix + run_id
                    commands[key] = self._save_command(key, run)
                except Exception as exc:  # a result that cannot be shown loses its record only
                    self._lost += 1
                    logger.warning("%s: the run record is not written: %r", run_id, exc)
            if commands:
                try:
                    self._send(commands, checked=not may_connect)
                except DOWN:
                    self._give_up(list(commands))
        finally:
            self._lock.release()

    def confirm_sent(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds until Redis has read what was sent (one PING)."""
        with self._lock:
            if not self._unconfirmed or self._connection is None:
                return
            for attempt in (1, 2):
                try:
                    if attempt == 2:  # the connection failed: everything again, on a new one
                        self._send({})
                    send(self._connection, PING_PACKED)
                    self._connection.read_response(timeout=timeout)
                except DOWN:
                    self._connection.disconnect()
                    continue
                self._unconfirmed.clear()
                return
            self._give_up(list(self._unconfirmed))
            self._unconfirmed.clear()

    def flush(self, timeout: float) -> bool:
        """Write what is held, wait until Redis has it; whether nothing was lost since the
        last flush."""
        self.write_held()
        self.confirm_sent(timeout)
        lost, self._lost = self._lost, 0
        return not lost and not self._unconfirmed

    def _save_command(self, key: str, run: TaskRun) -> Command:
        documents = self._documents
        document = documents.get(run.id)
        if document is None:
            if len(documents) >= _MAX_OPEN_DOCUMENTS:  # runs that never ended (killed)
                documents.clear()
            document = documents[run.id] = RunDocument(run)
        if run.state is not None and run.state.is_final():
            del documents[run.id]
        save = ("SET", key, document.encode(run))
        return save if self._px == "0" else (*save, "PX", self._px)

    def _send(self, commands: dict[str, Command], *, checked: bool = False) -> None:
        """Send ``commands`` (by record key), replies skipped, held back by the kernel
        (MSG_MORE) for more. On a new connection, the writes the old one carried without a
        confirmation go first; a failed send is made once more on a new connection.
        ``checked``: the caller has just seen that the connection is up."""
        for attempt in (1, 2):
            connection = self._connection
            up = connection is not None and connection._sock is not None
            if up and not checked and dropped(connection):
                connection.disconnect()
            remade = connection is None or connection._sock is None
            try:
                connection = self._usable_connection()
                if remade:
                    commands = {**self._unconfirmed, **commands}
                if not self._skips_replies:
                    send(connection, pack(list(commands.values())))
                    for _ in commands:
                        connection.read_response()
                    return
                send(connection, pack([p for c in commands.values() for p in (SKIP, c)]), MSG_MORE)
            except DOWN:
                if self._connection is not None:
                    self._connection.disconnect()
                if attempt == 2:
                    raise
                continue
            self._unconfirmed.update(commands)
            return

    def _give_up(self, keys: list[str]) -> None:
        self._lost += len(keys)
        shown = ", ".join(key[len(self._run_key_prefix) :] for key in keys[:3])
        more = ", ..." if len(keys) > 3 else ""
        logger.warning("%s%s: the run records are not written", shown, more, exc_info=True)

    def _connected(self) -> bool:
        connection = self._connection
        if connection is None or connection._sock is None:
            return False
        return not dropped(connection)  # a dropped one is remade by the flusher

    def _usable_connection(self) -> Any:
        """This process's connection for local records, (re)connected if need be: taken from
        the client's pool once and kept, so the pool's ``disconnect()`` closes it too."""
        connection = self._connection
        if connection is None:
            connection = self._connection = self._client.connection_pool.get_connection()
        if connection._sock is None:
            connection.connect()
        if self._skips_replies is None:
            self._skips_replies = replies_can_be_skipped(connection)
            if not self._skips_replies:
                connection.connect()
        return connection


class _Flusher:
    """One daemon thread per process that writes what recorders still hold, soon after."""

    def __init__(self) -> None:
        self._due: list[LocalRunRecorder] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._started = False  #: reset in a forked child, which needs a thread of its own

    def schedule(self, recorder: LocalRunRecorder) -> None:
        """Visit ``recorder`` within WRITE_BEHIND_SECONDS (the thread starts on first use)."""
        with self._lock:
            if recorder.due:
                return
            recorder.due = True
            if not self._started:
                self._started = True
                threading.Thread(
                    target=self._run, name="taskengine-run-records", daemon=True
                ).start()
                _write_held_at_exit()
            self._due.append(recorder)
            self._wake.set()

    def _run(self) -> None:
        wake = self._wake
        while True:
            wake.wait()
            time.sleep(WRITE_BEHIND_SECONDS)
            with self._lock:
                due, self._due = self._due, []
                wake.clear()
                for recorder in due:
                    recorder.due = False
            for recorder in due:
                try:
                    recorder.write_held()
                    recorder.confirm_sent(CONFIRM_TIMEOUT_SECONDS)
                except Exception:  # never let one store's trouble stop the others' records
                    logger.exception("local run records: the flusher failed")


_flusher = _Flusher()
_recorders: weakref.WeakKeyDictionary[RedisStore, LocalRunRecorder] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def _all_recorders() -> list[LocalRunRecorder]:
    with _registry_lock:
        return list(_recorders.values())


def _start_afresh_in_child() -> None:
    """After a fork: the parent's flusher thread may have held a lock (the child would wait
    on it forever), and what the parent held is the parent's to write."""
    global _registry_lock
    _registry_lock = threading.Lock()
    _flusher.__init__()  # type: ignore[misc]
    for recorder in _all_recorders():
        recorder.start_afresh()


os.register_at_fork(after_in_child=_start_afresh_in_child)


def recorder_for(store: RedisStore) -> LocalRunRecorder:
    """The local-run recorder for ``store`` in this process (one per store)."""
    recorder = _recorders.get(store)
    if recorder is None:
        with _registry_lock:
            recorder = _recorders.setdefault(store, LocalRunRecorder(store))
    return recorder


def flush_run_records(app: Celery | None = None, timeout: float = FLUSH_TIMEOUT_SECONDS) -> bool:
    """Send this process's held local run records and wait until Redis has them.

    Other processes see a local run's record within about 10 ms (see the module docstring);
    call this before handing a run id to another process that must see it at once. With
    ``app``, only that app's backend is waited for. Returns whether every record since the
    last call reached Redis within ``timeout`` seconds (the ones that did not were logged).
    """
    if app is not None:
        from celery_taskengine._store.redis_store import RedisStore
        from celery_taskengine._store.selection import store_for_app

        store = store_for_app(app)
        recorder = _recorders.get(store) if isinstance(store, RedisStore) else None
        recorders = [recorder] if recorder is not None else []
    else:
        recorders = _all_recorders()
    deadline = time.monotonic() + timeout
    results = [recorder.flush(max(0.0, deadline - time.monotonic())) for recorder in recorders]
    return all(results)


_exit_hook: list[bool] = []


def _write_held_at_exit() -> None:
    """Register (once per process) the writing of held records at interpreter exit; the
    kernel sends them as the process closes its connections."""
    if not _exit_hook:
        _exit_hook.append(True)
        atexit.register(_write_all_held)


def _write_all_held() -> None:
    for recorder in _all_recorders():
        with contextlib.suppress(Exception):  # exiting: there is nobody left to tell
            recorder.write_held()
