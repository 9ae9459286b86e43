"""One thread per process that keeps leases alive: delivery claims and SERIALIZABLE locks.

A lease (a claim, a lock) lives in the store with a time to live, so that a holder that dies
frees it; a holder that lives renews it. Each holder starting its own thread would cost a
thread per lock; one renewer per process serves them all. It must never stop while its
process lives: a renewal that raises (the store away, a bug, anything) is logged with the
lease's name and tried again on the next round, and a lease found lost is told so
(:meth:`Lease.on_lost`) so that its holder stops writing.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import threading
import time
from typing import Protocol

__all__ = ["Lease", "Renewer", "renewer"]

logger = logging.getLogger(__name__)

#: Seconds before retrying a renewal that raised (capped by the lease's own interval).
RETRY_SECONDS = 0.5


class Lease(Protocol):
    """What the renewer needs of a lease."""

    @property
    def name(self) -> str:
        """What logs call it (a run id, a lock's key)."""

    def renew(self) -> bool:
        """Extend the lease in the store; ``False`` if another holder has it now."""

    def on_lost(self) -> None:
        """Called once when :meth:`renew` found the lease taken: stop writing under it."""

    def renew_every(self) -> float:
        """Seconds between two renewals (and before the first one)."""


class Renewer:
    """Renews held leases from one daemon thread, started on first use."""

    def __init__(self) -> None:
        #: (due time, entry number, lease); an entry whose number is not the lease's current
        #: one in ``_held`` is stale (the lease was released, or rescheduled).
        self._due: list[tuple[float, int, Lease]] = []
        self._held: dict[int, int] = {}
        self._numbers = itertools.count()
        self._wake = threading.Condition()
        self._started = False
        #: When the thread wakes by itself (``inf``: only when told; ``-inf``: it is awake and
        #: looks at the schedule before it waits again). A lease due later needs no wake-up:
        #: a delivery holding a claim must not cost every task a thread switch.
        self._wakes_at = -math.inf

    def hold(self, lease: Lease) -> None:
        """Renew ``lease`` until :meth:`release`; the first renewal is one interval away."""
        with self._wake:
            due = self._push(lease, lease.renew_every())
            if not self._started:
                self._started = True
                thread = threading.Thread(target=self._run, name="taskengine-leases", daemon=True)
                thread.start()
            if due < self._wakes_at:  # due before the thread wakes: it must wake earlier
                self._wake.notify()

    def release(self, lease: Lease) -> None:
        """Stop renewing ``lease`` (it stays in the store until its holder frees it or it
        lapses)."""
        with self._wake:
            self._held.pop(id(lease), None)

    def holds(self, lease: Lease) -> bool:
        with self._wake:
            return id(lease) in self._held

    def _run(self) -> None:
        while True:
            try:
                lease = self._next_due()
                if lease is not None:
                    self._renew(lease)
            except Exception:  # never let the thread die: every held lease depends on it
                logger.exception("lease renewer: unexpected error; carrying on")
                time.sleep(RETRY_SECONDS)

    def _next_due(self) -> Lease | None:
        """Wait until a held lease is due and take it off the schedule; ``None`` to look again."""
        with self._wake:
            while self._due and self._held.get(id(self._due[0][2])) != self._due[0][1]:
                heapq.heappop(self._due)  # released or rescheduled meanwhile
            if not self._due:
                self._sleep(math.inf)
                return None
            due, _, lease = self._due[0]
            if due > time.monotonic():
                self._sleep(due)
                return None
            heapq.heappop(self._due)
            return lease

    def _sleep(self, until: float) -> None:
        """Wait (holding the condition) until monotonic time ``until`` or a wake-up."""
        self._wakes_at = until
        try:
            self._wake.wait(None if until == math.inf else max(0.0, until - time.monotonic()))
        finally:
            self._wakes_at = -math.inf

    def _renew(self, lease: Lease) -> None:
        try:
            kept = lease.renew()
        except Exception:
            logger.warning("%s: could not renew the lease; trying again", lease.name, exc_info=True)
            self._reschedule(lease, min(RETRY_SECONDS, lease.renew_every()))
            return
        if kept:
            self._reschedule(lease, lease.renew_every())
            return
        self.release(lease)
        try:
            lease.on_lost()
        except Exception:
            logger.exception("%s: error while giving up a lost lease", lease.name)

    def _reschedule(self, lease: Lease, delay: float) -> None:
        with self._wake:
            if id(lease) in self._held:
                self._push(lease, delay)

    def _push(self, lease: Lease, delay: float) -> float:
        """Schedule ``lease`` ``delay`` seconds from now; its due time."""
        number, due = next(self._numbers), time.monotonic() + delay
        self._held[id(lease)] = number
        heapq.heappush(self._due, (due, number, lease))
        return due


_renewer = Renewer()


def renewer() -> Renewer:
    """This process's renewer."""
    return _renewer


def _forget_in_child() -> None:
    """A forked child starts with no leases and no thread (its parent's are not its own), and
    with a lock no other thread may have held at the fork."""
    global _renewer
    _renewer = Renewer()


os.register_at_fork(after_in_child=_forget_in_child)
