"""When local run records are written: soon after by a thread, at exit, and on demand.

The :class:`~._store.local_records.LocalRunRecorder` holds records; this module decides when
they go out and says whether they arrived. One daemon thread per process visits every
recorder with records within :data:`WRITE_BEHIND_SECONDS`; the process's exit flushes them
too, both at interpreter exit (``atexit``) and at a ``multiprocessing`` child's normal exit,
which leaves through ``os._exit`` and so never runs ``atexit`` handlers.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["WRITE_BEHIND_SECONDS", "FlushResult", "Flusher"]

logger = logging.getLogger(__name__)

#: A record is held about this long, so the records of runs made meanwhile go out with it.
WRITE_BEHIND_SECONDS = 0.01
#: How long the flusher waits for Redis to confirm what was sent.
CONFIRM_TIMEOUT_SECONDS = 5.0
#: How long an exiting process waits for Redis to confirm its last records.
EXIT_TIMEOUT_SECONDS = 5.0
#: Seconds between the flusher's tries while Redis cannot be reached.
RETRY_DELAY_SECONDS = 0.5
#: Exit priority of the multiprocessing finalizer: before the ones that close pools and queues.
_FINALIZER_PRIORITY = 50


class Recorder(Protocol):
    """What the flusher asks of a recorder."""

    due: bool

    def write_held(self) -> None: ...

    def confirm_sent(self, timeout: float) -> bool: ...

    def flush(self, timeout: float, *, patience: float = ...) -> FlushResult: ...


@dataclass(frozen=True)
class FlushResult:
    """What :func:`~celery_taskengine.flush_run_records` found: false when records were lost.

    ``lost_runs`` names the runs whose records did not reach Redis (each was logged with the
    reason); ``lost`` counts them, also those not named (a process that never flushes keeps
    only the latest ids).
    """

    lost_runs: tuple[str, ...] = ()
    lost: int = 0

    def __bool__(self) -> bool:
        return self.lost == 0

    @classmethod
    def combine(cls, results: Iterable[FlushResult]) -> FlushResult:
        results = list(results)
        runs = [run for result in results for run in result.lost_runs]
        return cls(tuple(runs), max(len(runs), sum(result.lost for result in results)))


class Flusher:
    """One daemon thread per process that writes what recorders still hold, soon after."""

    def __init__(self, recorders: Callable[[], list[Recorder]]) -> None:
        self._recorders = recorders
        self._due: list[Recorder] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._started_in: int | None = None  #: pid: a forked child needs a thread of its own
        self._exit_hooks_in: int | None = None

    def start_afresh(self) -> None:
        """In a forked child: the parent's thread may have held the lock, and is not here."""
        self._due, self._lock, self._wake = [], threading.Lock(), threading.Event()
        self._started_in = None

    def schedule(self, recorder: Recorder) -> None:
        """Visit ``recorder`` within WRITE_BEHIND_SECONDS (the thread starts on first use)."""
        with self._lock:
            if recorder.due:
                return
            recorder.due = True
            if self._started_in != os.getpid():
                self._started_in = os.getpid()
                threading.Thread(
                    target=self._run, name="taskengine-run-records", daemon=True
                ).start()
                self._flush_at_exit()
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
                    if not recorder.confirm_sent(CONFIRM_TIMEOUT_SECONDS):
                        self.retry_later(recorder)
                except Exception:  # never let one store's trouble stop the others' records
                    logger.exception("local run records: the flusher failed")

    def retry_later(self, recorder: Recorder) -> None:
        """Visit ``recorder`` again after RETRY_DELAY_SECONDS (Redis could not be reached)."""
        timer = threading.Timer(RETRY_DELAY_SECONDS, self.schedule, (recorder,))
        timer.daemon = True
        timer.start()

    def _flush_at_exit(self) -> None:
        """Flush at this process's exit: ``atexit`` for interpreters that end normally, a
        multiprocessing finalizer for its children (registered in the child: the registry
        is emptied when a child starts)."""
        if self._exit_hooks_in == os.getpid():
            return
        if self._exit_hooks_in is None:
            atexit.register(self.flush_all)
        self._exit_hooks_in = os.getpid()
        multiprocessing.util.Finalize(None, self.flush_all, exitpriority=_FINALIZER_PRIORITY)

    def flush_all(self) -> None:
        # One budget for the whole exit, however many stores the process used: a process with
        # many recorders on servers that are gone must still leave within it.
        deadline = time.monotonic() + EXIT_TIMEOUT_SECONDS
        for recorder in self._recorders():
            try:
                # Nobody retries after the exit: what is unconfirmed then is lost (and logged).
                recorder.flush(max(0.0, deadline - time.monotonic()), patience=0.0)
            except Exception:  # exiting: there is nobody left to tell but the log
                logger.exception("local run records: the flush at exit failed")
