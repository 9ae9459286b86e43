"""Claims: one live delivery per Celery message, even when the broker hands it out twice.

Redis has no real acknowledgements: a message a worker holds longer than the visibility
timeout (an attempt that runs long, a retry's countdown waiting on the worker's timer) is given
out again while the first delivery is alive. A delivery cannot tell such a duplicate from a
crashed delivery's redelivery by looking at the run record (Running either way), so each
delivery claims its message first: ``claim:<task id>:<Celery retries>`` holds a token naming the
delivery, expires unless renewed (a crashed holder's claim lapses), is renewed while the
attempt runs (:class:`ClaimRenewer`), and says ``done`` once the delivery has written its
outcome (kept as long as run records).

A delivery that cannot claim waits while the holder lives; then it has nothing to do (the
holder finished: ``done``) or takes over a crashed holder's run (the claim lapsed). The cheap
path, a message's first delivery without a countdown, claims with a write that travels with the
run's Running record (see :mod:`~celery_taskengine._store.record_channel`); only messages
that may be duplicates (redelivered, retried, with a countdown) claim with a round trip.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

import redis

from celery_taskengine._store.redis_store import RedisStore

__all__ = [
    "CLAIM_TTL_SECONDS",
    "DONE",
    "Claim",
    "ClaimRenewer",
    "claim_or_wait",
]

logger = logging.getLogger(__name__)

#: Seconds a claim lives unless renewed: how long a crashed delivery's message waits before
#: another delivery takes its run over. Renewed every third of it while the attempt runs.
CLAIM_TTL_SECONDS = 15.0
#: The value of a claim whose delivery has written its outcome.
DONE = b"done"

_tokens = itertools.count()
_HOST = socket.gethostname()


@dataclass(frozen=True, slots=True)
class Claim:
    """A delivery's claim on its message: the key, and the token that says it is ours."""

    key: str
    token: str
    ttl: float

    @classmethod
    def new(cls, key: str, ttl: float) -> Claim:
        return cls(key, f"{_HOST}/{os.getpid()}/{next(_tokens)}", ttl)

    def take_command(self) -> tuple[str, ...]:
        """The write that takes the claim unconditionally (a first delivery's cheap path)."""
        return ("SET", self.key, self.token, "PX", str(_ms(self.ttl)))

    def done_command(self, px: str) -> tuple[str | bytes, ...]:
        """The write that marks the message handled (``px``: the run record's lifetime)."""
        if px == "0":
            return ("SET", self.key, DONE)
        return ("SET", self.key, DONE, "PX", px)


def claim_or_wait(client: redis.Redis, claim: Claim, poll: float) -> bool:
    """Take ``claim``, waiting while another live delivery holds it.

    ``True``: ours now (a crashed holder's run is ours to take over). ``False``: the holder
    finished with this message; this delivery has nothing to do.
    """
    ms = _ms(claim.ttl)
    announced = False
    while True:
        if client.set(claim.key, claim.token, nx=True, px=ms):
            return True
        holder = client.get(claim.key)
        if holder == DONE:
            return False
        if holder == claim.token.encode():  # our SET went through before a retried failure
            return True
        if holder is not None and not announced:
            announced = True
            logger.warning(
                "%s is being run by another delivery (%s): the broker handed the message out "
                "again (visibility timeout shorter than the run or its countdown?); waiting "
                "for that delivery to end",
                claim.key,
                holder.decode(errors="replace") if isinstance(holder, bytes) else holder,
            )
        time.sleep(poll)


class ClaimRenewer:
    """Renews the claims of this process's running deliveries from one daemon thread.

    A claim is renewed only once it is a third of its life old: short attempts cost nothing.
    """

    def __init__(self, store: RedisStore, ttl: float) -> None:
        self.store, self.ttl = store, ttl
        self._held: dict[Claim, float] = {}
        self._lock = threading.Lock()
        self._pid = 0

    def hold(self, claim: Claim) -> None:
        with self._lock:
            self._held[claim] = time.monotonic()
            if self._pid != os.getpid():  # first use in this process (or after a fork)
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="taskengine-claims", daemon=True).start()

    def release(self, claim: Claim) -> None:
        with self._lock:
            self._held.pop(claim, None)

    def _run(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            time.sleep(self.ttl / 3)
            due = time.monotonic() - self.ttl / 3
            with self._lock:
                claims = [claim for claim, since in self._held.items() if since <= due]
            for claim in claims:
                try:
                    if not self.store.renew_if_held(claim.key, claim.token, self.ttl):
                        logger.warning("%s: lost the delivery's claim while running", claim.key)
                        self.release(claim)
                except redis.RedisError:
                    logger.warning("%s: could not renew the delivery's claim", claim.key)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
