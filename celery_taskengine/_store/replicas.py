"""Writes that must outlive their master: confirmed by a replica (Redis ``WAIT``) when there is one.

Redis replicates asynchronously. A write the master answered and then lost with the master
(killed, its host gone, a Sentinel failover) is missing from the replica promoted in its place,
while the worker already counted it as made: a run's final record, or Celery's result, could
vanish in a failover though the caller saw the task succeed. So the writes a run's outcome
rests on (the final record, AwaitingRetry, Celery's result) are followed by ``WAIT n timeout``
on the same connection whenever the master has replicas: the write counts as made once a
replica has it, and a master lost before that breaks the connection, so the write is made
again on the new master.

Whether the master has replicas in sync is asked (``INFO replication``) at most every
:data:`RECHECK_SECONDS` per client (Celery makes one per thread); a master without them, or
one that cannot be asked or refuses ``WAIT`` (said once in the log), waits for nothing. A
replica that does not answer within :data:`WAIT_TIMEOUT_MS` lets the write count as made
(Redis' own ``WAIT`` semantics): a replica that lags without losing its link slows each
outcome's write by that much at most, about a second per task (its record, Celery's result).
``taskengine_replica_acks`` (default 1; 0 never waits) says how many replicas must have it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis

from celery_taskengine._store.settings import count_setting

__all__ = ["DEFAULT_REPLICA_ACKS", "WAIT_TIMEOUT_MS", "ReplicaAcks", "replica_acks_setting"]

logger = logging.getLogger(__name__)

#: Replicas that must have an outcome's writes, unless ``taskengine_replica_acks`` says.
DEFAULT_REPLICA_ACKS = 1
#: How long an outcome's write waits for its replicas at most, in ms.
WAIT_TIMEOUT_MS = 500
#: Seconds between two questions to the master about its replicas.
RECHECK_SECONDS = 5.0

_ATTRIBUTE = "_taskengine_replicas"


def replica_acks_setting(conf: Any) -> int:
    """The app's ``taskengine_replica_acks``: how many replicas must have an outcome."""
    return count_setting(conf, "taskengine_replica_acks", DEFAULT_REPLICA_ACKS)


class ReplicaAcks:
    """What an outcome's writes to ``client``'s master wait for: ``WAIT`` for as many of its
    replicas as it has, up to ``wanted``, or nothing."""

    def __init__(self, client: redis.Redis, wanted: int) -> None:
        self._client = client
        self.wanted = wanted
        #: Replicas the master had when last asked; unknown (None) until asked.
        self._replicas: int | None = None
        self._next_check = 0.0
        self._lock = threading.Lock()
        #: The server does not let this user ask (NOPERM): nothing is waited for.
        self._forbidden = False

    @classmethod
    def of(cls, client: redis.Redis, wanted: int) -> ReplicaAcks:
        """The one for ``client`` (kept on the client, so it lives and dies with it)."""
        found: ReplicaAcks | None = client.__dict__.get(_ATTRIBUTE)
        if found is None or found.wanted != wanted:
            found = cls(client, wanted)
            client.__dict__[_ATTRIBUTE] = found
        return found

    def wait_command(self) -> tuple[Any, ...] | None:
        """The ``WAIT`` to send after an outcome's writes, or ``None`` when there is no
        replica to wait for."""
        if not self.wanted or self._forbidden:
            return None
        now = time.monotonic()
        if now >= self._next_check and self._lock.acquire(blocking=False):
            try:
                self._next_check = now + RECHECK_SECONDS
                self._replicas = self._ask()
            finally:
                self._lock.release()
        replicas = min(self.wanted, self._replicas or 0)  # unknown: as without replicas
        return ("WAIT", replicas, WAIT_TIMEOUT_MS) if replicas else None

    def _ask(self) -> int | None:
        """How many replicas the master has online now; what was known before if it cannot
        say. ``WAIT 0 0`` (answered at once) rides along: a server or user that refuses it
        must never see one after an outcome's write."""
        pipe = self._client.pipeline(transaction=False)
        pipe.info("replication")
        pipe.execute_command("WAIT", 0, 0)  # type: ignore[no-untyped-call]
        try:
            info, waited = pipe.execute(raise_on_error=False)
        except redis.exceptions.RedisError as exc:  # down or failing over
            logger.debug("could not ask Redis about its replicas: %s", exc)
            self._next_check = time.monotonic() + 0.5
            return self._replicas
        if isinstance(info, dict) and info.get("role") not in (None, "master"):
            return 0  # demoted: WAIT is an error on a replica
        refused = next((r for r in (info, waited) if isinstance(r, Exception)), None)
        if refused is not None:  # NOPERM, or a server without INFO or WAIT
            logger.warning(
                "Redis does not let this user ask about replicas (%s): outcomes are not "
                "confirmed by a replica (allow INFO and WAIT, or set taskengine_replica_acks "
                "to 0 to say so)",
                refused,
            )
            self._forbidden = True
            return 0
        # Only replicas in sync count: WAIT waits for nothing else (one still loading its
        # first copy, or whose link died unnoticed, would make every outcome wait it out).
        return sum(
            1
            for key, value in info.items()
            if key.startswith("slave")
            and isinstance(value, dict)
            and value.get("state") == "online"
        )
