"""Writes a delivery need not wait for, made by one thread per process a moment later.

An attempt's Running record (with its claim and the backend's ``RUNNING``) must be visible
while the attempt runs, but a worker that waits for its commit waits for a second commit per
task, where plain Celery waits for one. So the delivery hands the write to this process's
writer thread, which makes it :data:`DEFER_SECONDS` later, and goes on with the attempt. When
the delivery has its next record to write (the outcome), it :meth:`settles <DeferredWrites.settle>`
the earlier one first: not started yet, it is dropped (the outcome's record holds everything
it said, and a short attempt then costs one commit); started, it is waited for, so the two
commit in order. A write that fails is logged with its run id; the outcome's own write, which
the delivery waits for, says whether the database took it.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable

__all__ = ["DEFER_SECONDS", "DeferredWrite", "DeferredWrites", "deferred_writes"]

logger = logging.getLogger(__name__)

#: Seconds a deferred write waits before the writer makes it: attempts shorter than this
#: never write their Running record (their outcome's record follows at once).
DEFER_SECONDS = 0.01

_QUEUED, _STARTED, _DONE, _DROPPED = range(4)


class DeferredWrite:
    """One write handed to the writer thread, and where it is."""

    __slots__ = ("due", "run_id", "stage", "write")

    def __init__(self, run_id: str, write: Callable[[], None], due: float) -> None:
        self.run_id = run_id
        self.write = write
        self.due = due
        self.stage = _QUEUED


class DeferredWrites:
    """This process's writer thread and its queue (in the order the writes were handed in)."""

    def __init__(self, delay: float = DEFER_SECONDS) -> None:
        self.delay = delay
        self._queue: collections.deque[DeferredWrite] = collections.deque()
        self._changed = threading.Condition()
        self._pid = 0
        _all.add(self)

    def submit(self, run_id: str, write: Callable[[], None]) -> DeferredWrite:
        """Make ``write()`` in the writer thread :attr:`delay` seconds from now."""
        job = DeferredWrite(run_id, write, time.monotonic() + self.delay)
        with self._changed:
            if self._pid != os.getpid():  # first use in this process (a worker's child)
                self._pid = os.getpid()
                thread = threading.Thread(
                    target=self._run, name="taskengine-deferred-writes", daemon=True
                )
                thread.start()
            self._queue.append(job)
            if len(self._queue) == 1:
                self._changed.notify_all()
        return job

    def settle(self, job: DeferredWrite) -> None:
        """Drop ``job`` if the writer has not started it, else wait until it is made."""
        with self._changed:
            if job.stage == _QUEUED:
                job.stage = _DROPPED
                return
            while job.stage == _STARTED:
                self._changed.wait()

    def _run(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            job = self._next()
            if job is None:
                continue
            try:
                job.write()
            except Exception as exc:  # the database refused or is gone: the outcome will say
                logger.error("%s: the attempt's start was not written: %r", job.run_id, exc)
            finally:
                with self._changed:
                    job.stage = _DONE
                    self._changed.notify_all()

    def _next(self) -> DeferredWrite | None:
        """The next write that is due, marked started (``None``: woken for nothing)."""
        with self._changed:
            while self._queue and self._queue[0].stage == _DROPPED:
                self._queue.popleft()
            if not self._queue:
                self._changed.wait()
                return None
            left = self._queue[0].due - time.monotonic()
            if left > 0:
                self._changed.wait(left)
                return None
            job = self._queue.popleft()
            if job.stage != _QUEUED:
                return None
            job.stage = _STARTED
            return job

    def _reset_in_child(self) -> None:
        self._changed = threading.Condition()
        self._queue.clear()
        self._pid = 0


_all: weakref.WeakSet[DeferredWrites] = weakref.WeakSet()
_writes: list[DeferredWrites] = []


def deferred_writes() -> DeferredWrites:
    """This process's writer (one for every store: writes stay in the order they came)."""
    if not _writes:
        _writes.append(DeferredWrites())
    return _writes[0]


def _after_fork_in_child() -> None:
    for writes in list(_all):
        writes._reset_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
