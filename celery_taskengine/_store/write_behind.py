"""Local run records written behind the caller, for stores without a faster way (SQL).

A local run lives in this process's memory store while it runs (``get_task_run`` looks there
first), and must also be visible to ``get_task_run`` from other processes, but a database round
trip per state would cost a cache hit several times the hit itself. So a run's latest state
is held, and a thread of the store's writes every held run in one transaction soon after
(:data:`WRITE_BEHIND_SECONDS`), or when :func:`flush_write_behind` asks. A run's thread never
waits for the database. Records the database refused are logged with their run ids and
reported by the next flush; a process leaving normally (``atexit``, or a ``multiprocessing``
child's own exit) writes what it still holds.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing.util
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from celery_taskengine._engine.observers import RunObserver, StateWrites
from celery_taskengine._store.memory import default_memory_store
from celery_taskengine._store.protocol import SHARED_STATES
from celery_taskengine.states import StateType

if TYPE_CHECKING:
    from celery_taskengine._engine.task_run import TaskRun
    from celery_taskengine.states import State

__all__ = ["WRITE_BEHIND_SECONDS", "WriteBehindRecorder", "flush_write_behind"]

logger = logging.getLogger(__name__)

#: A held record waits at most about this long before the writer thread saves it.
WRITE_BEHIND_SECONDS = 0.01


class WriteBehindRecorder(RunObserver):
    """The ``record`` callback of local runs on a store that saves runs in batches.

    ``save_runs`` writes a batch in one go and raises if it could not; ``name`` says where,
    in log messages.
    """

    writes_batch = False  # its records go behind the caller, on their own

    def __init__(self, save_runs: Callable[[list[TaskRun]], None], name: str) -> None:
        self._save_runs = save_runs
        self._name = name
        self._held: dict[str, TaskRun] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._writing = False
        self._lost: list[str] = []
        self._pid = 0
        _recorders.add(self)

    def on_state(self, run: TaskRun, state: State, batch: StateWrites) -> None:
        self(run, state)

    def __call__(self, run: TaskRun, state: State) -> None:
        if state.type is StateType.PENDING:  # this process finds the live run here
            default_memory_store().save_run(run)
            return
        first_running = state.type is StateType.RUNNING and run.run_count == 1
        if not first_running and state.type not in SHARED_STATES:
            return
        with self._lock:
            self._held[run.id] = run
            if not self._pid:  # first use in this process, or after a fork (_reset_in_child)
                self._start_writer()
        if not self._wake.is_set():  # set() again would take the event's lock and notify
            self._wake.set()

    def flush(self, timeout: float) -> tuple[bool, list[str]]:
        """Write what is held now; whether everything since the last flush was written, and
        the ids of the runs that were not."""
        deadline = time.monotonic() + timeout
        self._write_held()
        with self._idle:
            while self._writing and time.monotonic() < deadline:
                self._idle.wait(max(0.0, deadline - time.monotonic()))
            lost, self._lost = self._lost, []
            unwritten = list(self._held) if self._writing else []
        return not lost and not unwritten, lost + unwritten

    def _start_writer(self) -> None:
        """Called with the lock held."""
        self._pid = os.getpid()
        self._writing = False
        _write_at_exit()
        thread = threading.Thread(target=self._run, name="taskengine-run-records", daemon=True)
        thread.start()

    def _run(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            self._wake.wait()
            time.sleep(WRITE_BEHIND_SECONDS)
            self._wake.clear()
            self._write_held()

    def _write_held(self) -> None:
        with self._lock:
            if self._writing or not self._held:
                return
            batch, self._held = list(self._held.values()), {}
            self._writing = True
        try:
            self._save_runs(batch)
        except Exception as exc:  # the database refused or is gone: say which runs
            ids = [run.id for run in batch]
            shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
            logger.error("%s: run records not written to %s: %r", shown, self._name, exc)
            with self._lock:
                self._lost.extend(ids)
        finally:
            with self._idle:
                self._writing = False
                self._idle.notify_all()

    def _reset_in_child(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._held.clear()
        self._writing = False
        self._pid = 0


_recorders: weakref.WeakSet[WriteBehindRecorder] = weakref.WeakSet()


def flush_write_behind(
    recorders: Iterable[WriteBehindRecorder] | None = None, timeout: float = 5.0
) -> tuple[bool, list[str]]:
    """Flush ``recorders`` (default: all of this process's); as :meth:`flush` answers."""
    deadline = time.monotonic() + timeout
    ok, lost = True, list[str]()
    for recorder in list(_recorders if recorders is None else recorders):
        done, missing = recorder.flush(max(0.0, deadline - time.monotonic()))
        ok, lost = ok and done, lost + missing
    return ok, lost


#: The process whose exit writes what is held (see _write_at_exit).
_exit_pid: list[int] = [0]


def _write_at_exit() -> None:
    """Write what is held when this process leaves: ``atexit``, and for a ``multiprocessing``
    child (which leaves through ``os._exit``) a finalizer, registered after its start-up has
    cleared the ones it inherited."""
    if _exit_pid[0] != os.getpid():
        _exit_pid[0] = os.getpid()
        multiprocessing.util.Finalize(None, _write_all_held, exitpriority=10)


def _write_all_held() -> None:
    with contextlib.suppress(Exception):  # exiting: the recorders logged what failed
        flush_write_behind(timeout=5.0)


def _after_fork_in_child() -> None:
    for recorder in list(_recorders):
        recorder._reset_in_child()


atexit.register(_write_all_held)
os.register_at_fork(after_in_child=_after_fork_in_child)
