"""Recording local runs on a shared store without making the caller wait for it.

A local run (``t(...)`` in a producer or a script) on an app with a Redis result backend must be
visible to ``get_task_run`` from other processes, but a Redis round trip per state would cost a
local run far more than the run itself (a cache hit would cost four round trips instead of one).
So the live run object is kept in this process's memory store, where same-process reads find
it at once, and its document is written to the shared store by a daemon thread at the states
other processes care about: the first Running, AwaitingRetry, and the final state. The thread
gathers what arrives within :data:`BATCH_WINDOW_SECONDS` and writes it in one round trip, a run
that moved on meanwhile once: a cache hit's Running and Cached become one write, shared with
the runs around it, instead of a round trip each competing with the caller's own.
Pending records are flushed at exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from celery_taskengine.memory_store import default_memory_store
from celery_taskengine.result_store import ResultStore
from celery_taskengine.states import State, StateType
from celery_taskengine.task_run import TaskRun

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["BackgroundRunWriter", "flush_run_records", "writer_for"]

logger = logging.getLogger(__name__)

#: How long exit waits for records still queued.
FLUSH_ON_EXIT_SECONDS = 5.0
#: Seconds the writer waits, after a record arrives, for more to write with it (a flush does
#: not wait). Other processes see a local run this much later, at most.
BATCH_WINDOW_SECONDS = 0.002
#: At most this many runs per write, so one command stays small.
BATCH_MAX_RUNS = 500

_WORTH_SHARING = frozenset(
    {
        StateType.SCHEDULED,
        StateType.COMPLETED,
        StateType.FAILED,
        StateType.CANCELLED,
        StateType.CRASHED,
    }
)


class BackgroundRunWriter:
    """Keeps local runs live in memory and copies them to ``store`` from a daemon thread."""

    def __init__(self, store: ResultStore) -> None:
        self._store = store
        self._memory = default_memory_store()
        self._queue: queue.SimpleQueue[TaskRun | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()
        #: Set by a flush: write what is queued now, without waiting for the batch to fill.
        self._hurry = threading.Event()

    def record(self, run: TaskRun, state: State) -> None:
        """Called by the engine for every state the run enters; cheap on the caller's side."""
        kind = state.type
        if kind is StateType.PENDING:
            self._memory.save_run(run)
            return
        if kind in _WORTH_SHARING or (kind is StateType.RUNNING and run.run_count == 1):
            self._ensure_thread()
            self._queue.put(run)

    def flush(self, timeout: float = FLUSH_ON_EXIT_SECONDS) -> bool:
        """Wait until every queued record is written (or ``timeout``); whether it was."""
        return self.flush_marker().wait(timeout)

    def flush_marker(self) -> threading.Event:
        """An event set once everything queued before this call is written."""
        done = threading.Event()
        if self._thread is None or self._pid != os.getpid():
            done.set()
        else:
            self._queue.put(_Marker(done))  # type: ignore[arg-type]
            self._hurry.set()
        return done

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._pid == os.getpid():
            return
        with self._lock:
            if self._thread is not None and self._pid == os.getpid():
                return
            self._pid = os.getpid()  # a forked child starts its own writer
            self._queue = queue.SimpleQueue()
            self._hurry = threading.Event()
            self._thread = threading.Thread(
                target=self._drain, name="taskengine-run-writer", daemon=True
            )
            self._thread.start()
            if not _writers_flushed_at_exit:
                _writers_flushed_at_exit.append(True)
                atexit.register(flush_run_records)

    def _drain(self) -> None:
        while True:
            item: Any = self._queue.get()
            if not isinstance(item, _Marker):
                self._hurry.wait(BATCH_WINDOW_SECONDS)
            self._hurry.clear()
            batch: dict[str, TaskRun] = {}
            markers: list[_Marker] = []
            while True:
                if isinstance(item, _Marker):
                    markers.append(item)
                elif item is not None:
                    batch[item.id] = item  # several states of one run: write the latest once
                if len(batch) >= BATCH_MAX_RUNS:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write(list(batch.values()))
            for marker in markers:
                marker.done.set()

    def _write(self, runs: list[TaskRun]) -> None:
        save_runs = getattr(self._store, "save_runs", None)
        try:
            if save_runs is not None:
                save_runs(runs)
            else:
                for run in runs:
                    self._store.save_run(run)
        except Exception:  # records that cannot be written must not stop the writer
            ids = ", ".join(run.id for run in runs[:3]) + (", ..." if len(runs) > 3 else "")
            logger.warning("%s: could not write the local runs' records", ids, exc_info=True)


class _Marker:
    __slots__ = ("done",)

    def __init__(self, done: threading.Event) -> None:
        self.done = done


_writers: dict[int, BackgroundRunWriter] = {}
_writers_flushed_at_exit: list[bool] = []


def writer_for(store: ResultStore) -> BackgroundRunWriter:
    """The background writer for ``store`` in this process (one per store)."""
    writer = _writers.get(id(store))
    if writer is None:
        writer = _writers.setdefault(id(store), BackgroundRunWriter(store))
    return writer


def flush_run_records(app: Celery | None = None, timeout: float = FLUSH_ON_EXIT_SECONDS) -> bool:
    """Wait until this process's local runs are written to their result backends.

    Local runs reach other processes a few milliseconds after they end; call this before
    handing a run id to another process that must see it at once. With ``app``, only that
    app's backend is waited for (a backend that is down elsewhere does not hold you up).
    ``timeout`` bounds the whole wait; returns whether everything was written.
    """
    if app is not None:
        from celery_taskengine.result_store import store_for_app

        store = store_for_app(app)
        writers = [_writers[id(store)]] if id(store) in _writers else []
    else:
        writers = list(_writers.values())
    markers = [writer.flush_marker() for writer in writers]
    deadline = time.monotonic() + timeout
    return all(marker.wait(max(0.0, deadline - time.monotonic())) for marker in markers)
