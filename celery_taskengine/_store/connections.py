"""The connections the engine keeps to its Redis server, in a bounded pool of its own.

Early cache reads, the local-run recorder and worker runs' record writers keep connections
between uses: checking one out of redis-py's pool and back for every read costs about as much
as the rest of a cache hit. Taken from Celery's backend pool and kept, they would count against
``redis_max_connections`` and starve Celery's own commands; so they are made here, with the
backend client's ``connection_class`` and ``connection_kwargs``, and at most
``taskengine_store_max_connections`` of them exist at once (per process). When all are in use
:meth:`EnginePool.take` answers ``None`` and the caller falls back to a plain blocking command
through the client: slower, never failing for want of a connection.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any

import redis

__all__ = ["DEFAULT_MAX_CONNECTIONS", "EnginePool", "side_client"]

logger = logging.getLogger(__name__)

#: Connections a process keeps per store unless ``taskengine_store_max_connections`` says.
DEFAULT_MAX_CONNECTIONS = 10


class EnginePool:
    """Up to ``max_connections`` connections to ``client``'s server, handed out LIFO."""

    def __init__(self, client: redis.Redis, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        pool = client.connection_pool
        self.max_connections = max(0, int(max_connections))
        self._connection_class = pool.connection_class
        self._connection_kwargs = dict(pool.connection_kwargs)
        self._lock = threading.Lock()
        self._free: list[Any] = []
        self._made = 0
        self._pid = os.getpid()
        #: False once a connection could not be built from the kwargs (Sentinel pools).
        self._buildable = True
        weakref.finalize(self, _close_all, self._free)
        _pools.add(self)

    def take(self) -> Any:
        """An idle connection, or a new one while fewer than the bound exist; ``None`` if the
        pool is exhausted or its connections cannot be built (use the client instead)."""
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's connections stay theirs
                self._pid, self._free[:], self._made = os.getpid(), [], 0
            if self._free:
                return self._free.pop()
            if self._made >= self.max_connections or not self._buildable:
                return None
            self._made += 1
        try:
            return self._connection_class(**self._connection_kwargs)
        except TypeError:  # a pool whose connections need more (Sentinel): use the client
            logger.warning("Redis connections of the engine's own cannot be made; using the pool")
            with self._lock:
                self._buildable, self._made = False, self._made - 1
            return None

    def give_back(self, connection: Any, *, broken: bool = False) -> None:
        """Return ``connection``; a ``broken`` one (unread replies, a failed send) is closed
        first, so an old answer never meets a later read."""
        if broken:
            connection.disconnect()
        with self._lock:
            if getattr(connection, "pid", self._pid) != self._pid or self._pid != os.getpid():
                return  # made before a fork: not this process's to keep
            self._free.append(connection)

    def close(self) -> None:
        """Close the idle connections (ones in use are closed when given back broken)."""
        with self._lock:
            free, self._free[:] = list(self._free), []
            self._made -= len(free)
        _close_all(free)


def _close_all(connections: list[Any]) -> None:
    for connection in connections:
        try:
            connection.disconnect()
        except Exception:  # closing: nothing left to tell
            logger.debug("closing an engine connection failed", exc_info=True)


#: Every pool of this process, so a forked child can start them afresh.
_pools: weakref.WeakSet[EnginePool] = weakref.WeakSet()


def _start_afresh_in_child() -> None:
    """A thread of the parent may have held a pool's lock at the fork: in the child it would
    stay held for ever. The parent's connections stay the parent's (see take)."""
    for pool in list(_pools):
        pool._lock = threading.Lock()


os.register_at_fork(after_in_child=_start_afresh_in_child)


def side_client(client: redis.Redis) -> redis.Redis:
    """A client to ``client``'s server on connections of its own, for background threads.

    A worker's task thread writes run records on the pool's idle connection without checking
    it out (see record_channel's piggyback), so no other thread may take connections from that
    pool.
    """
    pool = client.connection_pool
    own = redis.BlockingConnectionPool(  # type: ignore[no-untyped-call]  # bounded: one renewer
        connection_class=pool.connection_class, max_connections=2, **pool.connection_kwargs
    )
    return redis.Redis(connection_pool=own)
