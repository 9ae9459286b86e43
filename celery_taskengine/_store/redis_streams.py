"""The Redis store's revoke markers, generator item streams and permission probe (a part of
:class:`~celery_taskengine._store.redis_store.RedisStore`, kept apart for size)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from typing import Any

import redis

from celery_taskengine._store.protocol import ItemBatch
from celery_taskengine._store.retrying import Patience

__all__ = ["RedisStreams"]

#: Seconds a revoke marker lives when run records never expire (a day, as Celery's results).
_MARKER_SECONDS = 86_400.0
#: Stream entry fields: an item, or the end marker.
_ITEM = b"i"
_END = b"e"


class RedisStreams:
    """Revoke markers and item streams next to the run records; a probe of permissions."""

    client: redis.Redis
    run_expires: float | None
    _prefix: str
    key_for: Callable[..., str]
    call: Callable[..., Any]
    patience: Patience

    def mark_revoked(self, run_id: str) -> None:
        """``SET revoked:<run id>``, living as long as run records."""
        expires = max(1, int(self.run_expires or _MARKER_SECONDS))
        key = self.key_for("revoked", run_id)
        self.call(lambda: self.client.set(key, 1, ex=expires), "a revoke marker", run_id)

    def is_revoked(self, run_id: str) -> bool:
        key = self.key_for("revoked", run_id)
        return bool(self.call(lambda: self.client.exists(key), "a revoke marker", run_id))

    def append_item(self, run_id: str, item: bytes) -> None:
        """``XADD`` to the run's stream (and renew its expiry), one round trip."""
        self._add_entry(run_id, {_ITEM: item})

    def end_items(self, run_id: str) -> None:
        self._add_entry(run_id, {_END: b"1"})

    def read_items(self, run_id: str, after: str, *, count: int, block: float) -> ItemBatch:
        """``XREAD`` (blocking when ``block`` > 0: redis-py reads ``block=0`` as forever)."""
        client: Any = self.client  # redis-py's stream types are too narrow to help
        wait = max(1, int(block * 1000)) if block > 0 else None
        streams = {self.key_for("items", run_id): after}
        batch = self.call(lambda: client.xread(streams, count=count, block=wait), "items", run_id)
        if not batch:
            return []
        return [
            (
                entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
                None if _END in fields else fields[_ITEM],
            )
            for entry_id, fields in batch[0][1]
        ]

    def _add_entry(self, run_id: str, fields: dict[bytes, bytes]) -> None:
        key = self.key_for("items", run_id)

        def add() -> None:
            pipe: Any = self.client.pipeline(transaction=False)
            pipe.xadd(key, fields)
            if self.run_expires is not None:
                pipe.pexpire(key, max(1, math.ceil(self.run_expires * 1000)))
            pipe.execute()

        self.call(add, "a generator item", run_id)

    def check_access(self) -> None:
        """Make each kind of call the engine makes on its keys once (a string, a sorted set,
        a script), so a missing permission is one clear error at a worker's start."""
        probe = f"{self._prefix}probe:{uuid.uuid4().hex}"

        def probe_calls() -> None:
            pipe: Any = self.client.pipeline(transaction=False)
            pipe.set(probe, 1, px=10_000)
            pipe.zadd(probe + ":z", {"probe": 1})
            pipe.eval("return redis.call('del', KEYS[1], KEYS[2])", 2, probe, probe + ":z")
            pipe.execute()

        # An outage, a failover or a full server is waited out; a missing grant is not.
        waited_out = tuple(
            e for e in self.patience.errors if e is not redis.exceptions.NoPermissionError
        )
        patience = Patience(self.patience.seconds, self.patience.longest_wait, waited_out)
        self.call(probe_calls, "its permission check", patience=patience)
