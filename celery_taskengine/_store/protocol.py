"""The storage protocol the engine needs: cached result records, locks, and run records.

Two implementations: :mod:`~celery_taskengine._store.memory` (one process, for local runs with
no result backend) and :mod:`~celery_taskengine._store.redis_store` (the Celery app's Redis
result backend, shared by every producer and worker);
:func:`~celery_taskengine._store.selection.store_for_app` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from celery_taskengine._engine.observers import RunObserver
from celery_taskengine.states import StateType

if TYPE_CHECKING:
    from celery_taskengine._engine.task_run import TaskRun

#: The states a local run's record is written at (with an attempt's first Running): the
#: ones other processes care about.
SHARED_STATES = frozenset(
    {
        StateType.SCHEDULED,
        StateType.COMPLETED,
        StateType.FAILED,
        StateType.CANCELLED,
        StateType.CRASHED,
    }
)

#: How a store records a local run's states (``None``: the store keeps the live run object).
LocalRecorder = RunObserver


__all__ = [
    "SHARED_STATES",
    "ItemBatch",
    "LocalRecorder",
    "ResultRecord",
    "ResultStore",
]

#: Stream entries as :meth:`ResultStore.read_items` gives them: ``(entry id, item or None)``,
#: ``None`` marking the end of the stream.
ItemBatch = list[tuple[str, bytes | None]]


@dataclass(frozen=True, slots=True)
class ResultRecord:
    """A committed result under a transaction key."""

    key: str
    value: Any
    serializer: str
    created_at: datetime
    expires_at: datetime | None = None
    task_name: str | None = None


@runtime_checkable
class ResultStore(Protocol):
    """Where committed results, SERIALIZABLE locks, run records and stream items live.

    Every method is synchronous and quick (an in-process dict or one Redis round trip); the
    async engine calls them directly. Keys given here are the engine's transaction keys and
    run ids; a store adds its own namespace and layout. Callers never test a store's class:
    they read its capabilities below.
    """

    #: Whether every process of the app sees what this store holds (workers need that).
    shared: bool
    #: Whether ``acquire_lock`` works across the processes that share this store.
    supports_locking: bool
    #: A password-free name of where the store keeps its records, for messages.
    url: str
    #: Whether deliveries claim their messages here (fencing tokens; see claims): Redis.
    claims: bool

    def read(self, key: str) -> ResultRecord | None:
        """The committed record, or ``None`` when missing, expired, corrupt or foreign.

        A corrupt or foreign record logs a warning and reads as a miss; it never raises.
        """

    def exists(self, key: str) -> bool:
        """Whether a valid (unexpired) record is stored under ``key``."""

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

        Raises :class:`~celery_taskengine.errors.SerializationError` before writing anything
        when the value cannot be encoded, or when ``serializer`` is not accepted by the app.
        """

    def delete(self, key: str) -> bool:
        """Remove the record; whether one was there."""

    def acquire_lock(self, key: str, holder: str, ttl: float) -> bool:
        """Try once to take the lock on ``key`` for ``ttl`` seconds; never blocks."""

    def renew_lock(self, key: str, holder: str, ttl: float) -> bool:
        """Extend a lock ``holder`` still holds; ``False`` if it lost it."""

    def release_lock(self, key: str, holder: str) -> None:
        """Release the lock if ``holder`` holds it (never someone else's)."""

    def lock_holder(self, key: str) -> str | None:
        """Who holds the lock on ``key`` now, if anyone."""

    def save_run(self, run: TaskRun) -> None:
        """Record the run as it is now (called on every state change)."""

    def load_run(self, run_id: str) -> TaskRun | None:
        """The run record for ``run_id``, or ``None`` when unknown."""

    def iter_runs(self, limit: int) -> list[TaskRun]:
        """Up to ``limit`` runs, the most recently active first (for tools, not hot paths)."""

    def list_runs(
        self, limit: int, *, task: str | None = None, state: str | None = None
    ) -> list[TaskRun]:
        """Up to ``limit`` runs of ``task`` in ``state`` (see run_filters), newest first."""

    def iter_keys(self, prefix: str = "") -> list[str]:
        """The transaction keys of stored records starting with ``prefix``, sorted."""

    def local_recorder(self) -> LocalRecorder | None:
        """How local runs record their states here; ``None`` when saving the live run once,
        at creation, is enough (a store that keeps the object itself)."""

    def worker_observers(self, app: Any, delivery: Any) -> list[RunObserver]:
        """The observers by which a worker delivery (``worker_records.Delivery``) of ``app``
        records its run here: the run record, the claim, Celery's task meta (see observers)."""

    def rides_with(self, backend: Any) -> bool:
        """Whether run records may ride on ``backend``'s own connections (same server)."""

    def mark_revoked(self, run_id: str) -> None:
        """Leave a marker that ``run_id`` was revoked, for attempts in other processes."""

    def is_revoked(self, run_id: str) -> bool:
        """Whether :meth:`mark_revoked` was called for ``run_id`` (and has not expired)."""

    def append_item(self, run_id: str, item: bytes) -> None:
        """Append an encoded item to ``run_id``'s stream of generator items."""

    def end_items(self, run_id: str) -> None:
        """Mark ``run_id``'s stream finished: readers stop there."""

    def read_items(self, run_id: str, after: str, *, count: int, block: float) -> ItemBatch:
        """Up to ``count`` stream entries after entry id ``after`` (``"0-0"``: from the start),
        waiting up to ``block`` seconds for one to come (``0``: not at all)."""
