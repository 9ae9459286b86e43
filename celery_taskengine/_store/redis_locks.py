"""The Redis store's locks (a part of :class:`~celery_taskengine._store.redis_store.RedisStore`,
as its claims, run records and streams are): SERIALIZABLE isolation's lock per transaction key,
``<prefix>lock:<key>`` holding its holder's id with a PX ttl, renewed while held, released only
by its holder.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import redis

from celery_taskengine._store.connections import side_client
from celery_taskengine._store.retrying import Patience

__all__ = ["RELEASE_LUA", "RedisLocks", "milliseconds"]

# Both scripts act only if the lock still holds the caller's id, so a holder whose ttl ran out
# can never release or extend the lock a newer holder has taken since.
RELEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_RENEW_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""


def milliseconds(seconds: float) -> int:
    """``seconds`` as Redis' PX: rounded up, so Redis never drops a record before its envelope
    says it expires, and at least 1, because PX 0 is an error."""
    return max(1, math.ceil(seconds * 1000))


class RedisLocks:
    """Locks on the store's Redis database."""

    client: redis.Redis
    patience: Patience
    _release: Any
    _renew: Any
    key_for: Callable[..., str]
    call: Callable[..., Any]

    def acquire_lock(self, key: str, holder: str, ttl: float) -> bool:
        """``SET lock holder NX PX ttl``: take the lock unless anyone holds it; never blocks.

        Not re-entrant: a holder asking again is refused too. A holder that dies loses the
        lock after ``ttl`` seconds.
        """
        redis_key, ms = self.key_for("lock", key), milliseconds(_check_ttl(ttl))
        taken = self.call(
            lambda: self.client.set(redis_key, holder, nx=True, px=ms), f"taking lock {key!r}"
        )
        return bool(taken)

    def renew_lock(self, key: str, holder: str, ttl: float) -> bool:
        """Give ``holder``'s lock ``ttl`` more seconds from now; ``False`` if it lost it.
        Waits out an outage at most ``ttl`` seconds: later, the lock has lapsed anyway."""
        redis_key, ttl = self.key_for("lock", key), _check_ttl(ttl)
        patience = Patience(min(self.patience.seconds, ttl), self.patience.longest_wait)
        renew = lambda: self.renew_if_held(redis_key, holder, ttl)  # noqa: E731
        return bool(self.call(renew, f"renewing lock {key!r}", patience=patience))

    def renew_if_held(self, redis_key: str, holder: str, ttl: float) -> bool:
        """Extend ``redis_key`` to ``ttl`` seconds from now if it still holds ``holder`` (a
        lock's or a delivery claim's owner). Called from renewer threads: see side_client."""
        if self._renew is None:  # on connections of its own, made by the first renewal
            self._renew = side_client(self.client).register_script(_RENEW_LUA)
        return bool(self._renew(keys=[redis_key], args=[holder, milliseconds(ttl)]))

    def release_lock(self, key: str, holder: str) -> None:
        """Release the lock if ``holder`` holds it; another holder's lock is left alone."""
        redis_key = self.key_for("lock", key)
        self.call(lambda: self._release(keys=[redis_key], args=[holder]), f"releasing {key!r}")

    def lock_holder(self, key: str) -> str | None:
        """Who holds the lock on ``key`` now, if anyone."""
        redis_key = self.key_for("lock", key)
        holder = self.call(lambda: self.client.get(redis_key), f"reading lock {key!r}")
        return _text(holder) if holder is not None else None


def _check_ttl(ttl: float) -> float:
    if not ttl > 0:
        raise ValueError(f"lock ttl must be a positive number of seconds, got {ttl!r}")
    return ttl


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
