"""Recording local runs on the shared store without making the caller wait for Redis.

A local run (``t(...)`` in a producer or a script) on an app with a Redis result backend must be
visible to ``get_task_run`` from other processes, but a round trip per state would cost a local
run far more than the run itself: a cache hit would cost three round trips instead of one. So
the live run object is kept in this process's memory store, where same-process reads find it at
once, and its document is written to Redis at the states other processes care about (the first
Running, AwaitingRetry, and the final state) as writes that wait for no answer
(``CLIENT REPLY SKIP``), on one connection per process and store, held back by the kernel
(``MSG_MORE``): they leave when a packet's worth has gathered, after 200 ms at most, when the
process exits, or at once with :func:`flush_run_records`.

Measured on the 2-core reference machine (``bench/cache_costs.py``): a send that wakes Redis
costs its caller about 30 µs (on loopback the sender's system call wakes the receiver); one
held back costs about 3 µs. A background thread that batched these writes cost a cache hit
about 30 µs, and writes sent at once about as much.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from celery_taskengine.memory_store import default_memory_store
from celery_taskengine.redis_wire import (
    DOWN,
    MSG_MORE,
    PING_PACKED,
    SKIP,
    dropped,
    pack,
    replies_can_be_skipped,
    send,
)
from celery_taskengine.run_document import RunDocument
from celery_taskengine.states import State, StateType
from celery_taskengine.task_meta import px
from celery_taskengine.task_run import TaskRun

if TYPE_CHECKING:
    from celery import Celery

    from celery_taskengine.redis_store import RedisStore

__all__ = ["LocalRunRecorder", "flush_run_records", "recorder_for"]

logger = logging.getLogger(__name__)

#: How long ``flush_run_records`` waits by default.
FLUSH_TIMEOUT_SECONDS = 5.0
#: A record waits at most this long for a later one to be written with (see LocalRunRecorder).
WRITE_BEHIND_SECONDS = 0.01
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
    only if it is still running when the flusher comes.
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
        #: The process in which the flusher will visit this recorder (see _Flusher).
        self.due_in = 0
        #: Held while encoding and sending, so a run's later state is always written later.
        self._lock = threading.Lock()
        self._connection: Any = None
        self._pid = 0
        #: Whether the server honours CLIENT REPLY SKIP; if not, records are written blocking.
        self._skips_replies: bool | None = None

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
        if self.due_in != os.getpid():
            _flusher.schedule(self)

    def start_afresh(self) -> None:
        """In a forked child: new lock, nothing held, no connection (the parent's stays open
        for the parent)."""
        self._lock = threading.Lock()
        self._held.clear()
        self._connection = None
        self.due_in = 0

    def write_held(self, but: str | None = None, *, may_connect: bool = True) -> None:
        """Write the held records (except run ``but``'s) now, without waiting for Redis.

        Without ``may_connect`` (a run's own thread) nothing is written unless the connection
        is up: connecting may block, so the flusher thread does it.
        """
        with self._lock:
            if not may_connect and not self._connected():
                return
            held = self._held
            commands: list[tuple[Any, ...]] = []
            ids: list[str] = []
            for run_id in list(held):
                run = held.pop(run_id, None) if run_id != but else None
                if run is None:
                    continue
                try:
                    commands.append(self._save_command(run))
                    ids.append(run_id)
                except (TypeError, ValueError) as exc:
                    logger.warning("%s: the run record is not written: %s", run_id, exc)
            if not commands:
                return
            try:
                self._send(commands)
            except DOWN:
                shown = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
                logger.warning("%s: the run records are not written", shown, exc_info=True)

    def confirm(self, timeout: float) -> bool:
        """Write what is held and wait up to ``timeout`` seconds until Redis has it."""
        self.write_held()
        with self._lock:
            if self._connection is None or self._pid != os.getpid():
                return True
            try:
                self._connection.send_packed_command([PING_PACKED], check_health=False)
                self._connection.read_response(timeout=timeout)
            except DOWN as exc:
                self._connection.disconnect()
                logger.warning("run records not confirmed: %s", exc)
                return False
        return True

    def _save_command(self, run: TaskRun) -> tuple[Any, ...]:
        documents = self._documents
        document = documents.get(run.id)
        if document is None:
            if len(documents) >= _MAX_OPEN_DOCUMENTS:  # runs that never ended (killed)
                documents.clear()
            document = documents[run.id] = RunDocument(run)
        if run.state is not None and run.state.is_final():
            del documents[run.id]
        save: tuple[Any, ...] = ("SET", self._run_key_prefix + run.id, document.encode(run))
        return save if self._px == "0" else (*save, "PX", self._px)

    def _send(self, commands: list[tuple[Any, ...]]) -> None:
        """Send ``commands``, replies skipped, held back by the kernel (MSG_MORE) for more."""
        connection = self._held_connection()
        if not self._skips_replies:
            pipe = self._client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)  # type: ignore[no-untyped-call]
            pipe.execute()
            return
        data = pack([part for command in commands for part in (SKIP, command)])
        try:
            send(connection, data, MSG_MORE)
        except DOWN:
            connection.disconnect()
            connection.connect()  # once more on a fresh connection, then give up
            send(connection, data, MSG_MORE)

    def _connected(self) -> bool:
        connection = self._connection
        if connection is None or self._pid != os.getpid() or connection._sock is None:
            return False
        if dropped(connection):
            connection.disconnect()
            return False
        return True

    def _held_connection(self) -> Any:
        """This process's connection for local records, remade after a fork or a hang-up."""
        connection = self._connection
        if connection is not None and self._pid == os.getpid():
            if dropped(connection):  # a send on it would be lost without an error
                connection.disconnect()
                connection.connect()
            return connection
        pool = self._client.connection_pool
        connection = pool.connection_class(**pool.connection_kwargs)
        connection.connect()
        if self._skips_replies is None:
            self._skips_replies = replies_can_be_skipped(connection)
            if not self._skips_replies:
                connection.connect()
        self._connection, self._pid = connection, os.getpid()
        return connection


class _Flusher:
    """One daemon thread per process that writes what recorders still hold, soon after."""

    def __init__(self) -> None:
        self._due: list[LocalRunRecorder] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pid = 0

    def schedule(self, recorder: LocalRunRecorder) -> None:
        """Visit ``recorder`` within WRITE_BEHIND_SECONDS (the thread starts on first use)."""
        with self._lock:
            pid = os.getpid()
            if recorder.due_in == pid:
                return
            recorder.due_in = pid
            if self._pid != pid:  # first use, or a forked child: a thread of its own
                self._pid = pid
                self._due = []
                self._wake = threading.Event()
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
                    recorder.due_in = 0
            for recorder in due:
                recorder.write_held()


_flusher = _Flusher()
_recorders: weakref.WeakKeyDictionary[RedisStore, LocalRunRecorder] = weakref.WeakKeyDictionary()


def _start_afresh_in_child() -> None:
    """After a fork: the parent's flusher thread may have held a lock (the child would wait
    on it forever), and what the parent held is the parent's to write."""
    _flusher.__init__()  # type: ignore[misc]
    for recorder in list(_recorders.values()):
        recorder.start_afresh()


os.register_at_fork(after_in_child=_start_afresh_in_child)


def recorder_for(store: RedisStore) -> LocalRunRecorder:
    """The local-run recorder for ``store`` in this process (one per store)."""
    recorder = _recorders.get(store)
    if recorder is None:
        recorder = _recorders.setdefault(store, LocalRunRecorder(store))
    return recorder


def flush_run_records(app: Celery | None = None, timeout: float = FLUSH_TIMEOUT_SECONDS) -> bool:
    """Send this process's held local run records and wait until Redis has them.

    Other processes see a local run's record within about 200 ms (see the module docstring);
    call this before handing a run id to another process that must see it at once. With
    ``app``, only that app's backend is waited for. Returns whether every backend confirmed
    within ``timeout`` seconds.
    """
    if app is not None:
        from celery_taskengine.redis_store import RedisStore
        from celery_taskengine.result_store import store_for_app

        store = store_for_app(app)
        recorder = _recorders.get(store) if isinstance(store, RedisStore) else None
        recorders = [recorder] if recorder is not None else []
    else:
        recorders = list(_recorders.values())
    deadline = time.monotonic() + timeout
    return all(recorder.confirm(max(0.0, deadline - time.monotonic())) for recorder in recorders)


_exit_hook: list[bool] = []


def _write_held_at_exit() -> None:
    """Register (once per process) the writing of held records at interpreter exit; the
    kernel sends them as the process closes its connections."""
    if not _exit_hook:
        _exit_hook.append(True)
        atexit.register(_write_all_held)


def _write_all_held() -> None:
    for recorder in list(_recorders.values()):
        recorder.write_held()
