"""SERIALIZABLE locks as leases: taken for a transaction, kept alive while its holder works.

The transaction logic only asks for a lock (a ``TakeLock`` step) and gives it back; the
drivers carry that out here, so the renewal thread is started by the driver, never by a
transaction object.
"""

from __future__ import annotations

import logging

from celery_taskengine._store.protocol import ResultStore
from celery_taskengine._store.renewer import renewer

__all__ = ["LockLease", "take_lock"]

logger = logging.getLogger("celery_taskengine.transactions")


class LockLease:
    """A SERIALIZABLE lock, kept alive by the process's renewer while its holder works."""

    def __init__(self, store: ResultStore, key: str, holder: str, ttl: float) -> None:
        self._store, self._key, self._holder, self._ttl = store, key, holder, ttl

    @property
    def name(self) -> str:
        return self._key

    def renew(self) -> bool:
        return self._store.renew_lock(self._key, self._holder, self._ttl)

    def renew_every(self) -> float:
        return self._ttl / 3

    def on_lost(self) -> None:
        logger.warning("%s: lost the SERIALIZABLE lock before finishing", self._key)

    def release(self) -> None:
        """Stop renewing and free the lock; a store that cannot be reached lets it expire."""
        renewer().release(self)
        try:
            self._store.release_lock(self._key, self._holder)
        except Exception:
            logger.warning("%s: could not release the SERIALIZABLE lock; it will expire", self._key)


def take_lock(store: ResultStore, key: str, holder: str, ttl: float) -> LockLease | None:
    """Try once to take ``key``'s lock; the renewed lease, or ``None`` if another holds it."""
    if not store.acquire_lock(key, holder, ttl):
        return None
    lease = LockLease(store, key, holder, ttl)
    renewer().hold(lease)
    return lease
