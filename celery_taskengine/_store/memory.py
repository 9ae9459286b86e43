"""The in-process store: cached results, locks and run records for local runs without a backend.

It behaves like :class:`~celery_taskengine._store.redis_store.RedisStore` seen from one process:
records are kept encoded (the same envelope and serializer), so a cache hit is a fresh decoded
copy and an unserialisable result fails here exactly as it would on Redis. Run records are the
opposite: the engine's own :class:`TaskRun` objects are kept as they are, because saving them
happens on every state change of every local run and must cost microseconds.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

from celery_taskengine._engine.observers import RunObserver, SavedOnCreate
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._store.cache_codec import decode_record, encode_record, normalize_accept
from celery_taskengine._store.protocol import ItemBatch, ResultRecord
from celery_taskengine._store.run_filters import run_matches

__all__ = ["DEFAULT_MAX_RUNS", "MemoryStore", "default_memory_store"]

logger = logging.getLogger(__name__)

#: How many run records a store keeps before dropping the least recently saved.
DEFAULT_MAX_RUNS = 10_000

#: Expired cache entries are swept after this many writes, so unread keys don't pile up.
_SWEEP_EVERY = 1024


class _Entry(NamedTuple):
    raw: bytes
    deadline: float | None  # clock() value at which the record expires; None: never


class MemoryStore:
    """A :class:`~celery_taskengine._store.protocol.ResultStore` for one process; thread-safe.

    ``clock`` returns wall-clock seconds (``time.time`` by default) and decides every expiry,
    of records and of locks alike; inject one for exact tests. ``accept`` lists the serializers
    records may use; by default JSON and pickle, since nothing stored here leaves the process.
    """

    shared: bool = False
    supports_locking: bool = True
    url: str = "memory://"

    def __init__(
        self,
        *,
        max_runs: int = DEFAULT_MAX_RUNS,
        accept: Iterable[str] | None = ("json", "pickle"),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_runs < 1:
            raise ValueError(f"max_runs must be at least 1, got {max_runs!r}")
        self.max_runs = max_runs
        self.accept = normalize_accept(accept)
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, tuple[str, float]] = {}
        self._runs: OrderedDict[str, TaskRun] = OrderedDict()
        self._writes = 0
        self._revoked: set[str] = set()
        self._items: dict[str, ItemBatch] = {}
        self._item_added = threading.Condition(self._lock)

    # -- cached results ------------------------------------------------------------------

    def read(self, key: str) -> ResultRecord | None:
        """The committed record, or ``None`` when missing, expired, corrupt or foreign."""
        now = self._clock()
        with self._lock:
            entry = self._live_entry(key, now)
        if entry is None:
            return None
        try:
            return decode_record(entry.raw, self.accept, key=key)
        except ValueError as exc:
            logger.warning("Ignoring unreadable cache record under key %r: %s", key, exc)
            return None

    def exists(self, key: str) -> bool:
        """Whether an unexpired record is stored under ``key``."""
        now = self._clock()
        with self._lock:
            return self._live_entry(key, now) is not None

    def write(
        self,
        key: str,
        value: Any,
        *,
        serializer: str,
        expires_in: float | None,
        task_name: str | None = None,
    ) -> None:
        """Store ``value`` under ``key`` for ``expires_in`` seconds (``None``: no expiry).

        The value is encoded first, so a :class:`SerializationError` leaves the store as it
        was. ``expires_in <= 0`` writes a record that is already expired: the key is cleared.
        """
        now = self._clock()
        created_at = _utc(now)
        expires_at = None if expires_in is None else created_at + timedelta(seconds=expires_in)
        raw = encode_record(
            key,
            value,
            serializer=serializer,
            accept=self.accept,
            created_at=created_at,
            expires_at=expires_at,
            task_name=task_name,
        )
        self._put(key, raw, expires_in, now)

    def write_raw(self, key: str, raw: bytes, *, expires_in: float | None = None) -> None:
        """Store already-encoded bytes under ``key``, as a Redis ``SET`` of them would.

        For tools and tests: reading checks these bytes like any record.
        """
        self._put(key, raw, expires_in, self._clock())

    def delete(self, key: str) -> bool:
        """Remove the record; whether an unexpired one was there."""
        now = self._clock()
        with self._lock:
            entry = self._live_entry(key, now)
            self._entries.pop(key, None)
        return entry is not None

    def iter_keys(self, prefix: str = "") -> list[str]:
        """The keys of unexpired records starting with ``prefix``, sorted."""
        now = self._clock()
        with self._lock:
            self._sweep(now)
            return sorted(k for k in self._entries if k.startswith(prefix))

    # -- locks ---------------------------------------------------------------------------

    def acquire_lock(self, key: str, holder: str, ttl: float) -> bool:
        """Take the lock on ``key`` for ``ttl`` seconds unless anyone holds it; never blocks.

        Not re-entrant, like Redis ``SET NX``: a holder asking again is refused too.
        """
        _check_ttl(ttl)
        now = self._clock()
        with self._lock:
            if self._live_holder(key, now) is not None:
                return False
            self._locks[key] = (holder, now + ttl)
            return True

    def renew_lock(self, key: str, holder: str, ttl: float) -> bool:
        """Give ``holder``'s lock ``ttl`` more seconds from now; ``False`` if it lost it."""
        _check_ttl(ttl)
        now = self._clock()
        with self._lock:
            if self._live_holder(key, now) != holder:
                return False
            self._locks[key] = (holder, now + ttl)
            return True

    def release_lock(self, key: str, holder: str) -> None:
        """Release the lock if ``holder`` holds it; another holder's lock is left alone."""
        now = self._clock()
        with self._lock:
            if self._live_holder(key, now) == holder:
                del self._locks[key]

    def lock_holder(self, key: str) -> str | None:
        """Who holds the lock on ``key`` now; an expired lock has no holder."""
        now = self._clock()
        with self._lock:
            return self._live_holder(key, now)

    # -- run records ---------------------------------------------------------------------

    def save_run(self, run: TaskRun) -> None:
        """Keep ``run`` itself (not a copy); the least recently saved run goes past max_runs."""
        with self._lock:
            runs = self._runs
            runs[run.id] = run
            runs.move_to_end(run.id)
            if len(runs) > self.max_runs:
                runs.popitem(last=False)

    def load_run(self, run_id: str) -> TaskRun | None:
        """The very TaskRun object last saved under ``run_id``, or ``None``."""
        with self._lock:
            return self._runs.get(run_id)

    def iter_runs(self, limit: int) -> list[TaskRun]:
        """Up to ``limit`` runs, the most recently saved first."""
        with self._lock:
            return list(itertools.islice(reversed(self._runs.values()), max(limit, 0)))

    claims: bool = False

    def worker_observers(self, app: Any, delivery: Any) -> list[RunObserver]:
        """The worker's run lives here as the object itself: saved once, when created."""
        return [SavedOnCreate(self)]

    def rides_with(self, backend: Any) -> bool:
        return False

    def local_recorder(self) -> None:
        """None: the store keeps the live run object, saved once when it is created."""
        return None

    def list_runs(
        self, limit: int, *, task: str | None = None, state: str | None = None
    ) -> list[TaskRun]:
        """A scan of the runs this process keeps, newest first."""
        with self._lock:
            newest_first = list(reversed(self._runs.values()))
        found = (run for run in newest_first if run_matches(run, task, state))
        return list(itertools.islice(found, max(limit, 0)))

    # -- revokes and generator items -----------------------------------------------------

    def mark_revoked(self, run_id: str) -> None:
        with self._lock:
            self._revoked.add(run_id)

    def is_revoked(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._revoked

    def append_item(self, run_id: str, item: bytes) -> None:
        self._add_entry(run_id, item)

    def end_items(self, run_id: str) -> None:
        self._add_entry(run_id, None)

    def read_items(self, run_id: str, after: str, *, count: int, block: float) -> ItemBatch:
        """Entry ids are ``"<n>-0"``, n counting from 1, as Redis streams look."""
        start = int(after.split("-")[0])
        deadline = time.monotonic() + max(block, 0.0)
        with self._item_added:
            while True:
                entries = self._items.get(run_id, [])[start : start + count]
                left = deadline - time.monotonic()
                if entries or left <= 0:
                    return list(entries)
                self._item_added.wait(left)

    # -- internals -----------------------------------------------------------------------

    def _add_entry(self, run_id: str, item: bytes | None) -> None:
        with self._item_added:
            entries = self._items.setdefault(run_id, [])
            entries.append((f"{len(entries) + 1}-0", item))
            self._item_added.notify_all()

    def _put(self, key: str, raw: bytes, expires_in: float | None, now: float) -> None:
        deadline = None if expires_in is None else now + expires_in
        with self._lock:
            if deadline is not None and deadline <= now:
                self._entries.pop(key, None)
                return
            self._entries[key] = _Entry(raw, deadline)
            self._writes += 1
            if self._writes % _SWEEP_EVERY == 0:
                self._sweep(now)

    # The helpers below expect the caller to hold self._lock.

    def _live_entry(self, key: str, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and entry.deadline is not None and entry.deadline <= now:
            del self._entries[key]
            return None
        return entry

    def _live_holder(self, key: str, now: float) -> str | None:
        held = self._locks.get(key)
        if held is None:
            return None
        holder, deadline = held
        if deadline <= now:  # the holder died or overran its ttl: the lock is free
            del self._locks[key]
            return None
        return holder

    def _sweep(self, now: float) -> None:
        expired = [
            k for k, e in self._entries.items() if e.deadline is not None and e.deadline <= now
        ]
        for key in expired:
            del self._entries[key]

    def _reset_after_fork(self) -> None:
        # Another thread may have held the lock at fork time; in the child it would stay held.
        self._lock = threading.Lock()
        self._item_added = threading.Condition(self._lock)


def _check_ttl(ttl: float) -> None:
    if not ttl > 0:
        raise ValueError(f"lock ttl must be a positive number of seconds, got {ttl!r}")


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


_default_store = MemoryStore()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_default_store._reset_after_fork)


def default_memory_store() -> MemoryStore:
    """The process-wide store used for local runs when no result backend is configured."""
    return _default_store
