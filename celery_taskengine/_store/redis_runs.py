"""The Redis store's run records: saving, loading and listing them, and who records them (a
part of :class:`~celery_taskengine._store.redis_store.RedisStore`, as claims and streams are).

A run record is ``<prefix>run:<run id>``, a JSON document (see
:mod:`~celery_taskengine._store.run_document`) living ``run_expires`` seconds, written with its
entries in the run index (:mod:`~celery_taskengine._store.run_index`) in the same round trip.
Worker deliveries and local runs record through writers of their own
(:mod:`~celery_taskengine._store.worker_records`, :mod:`~celery_taskengine._store.local_records`)
that send without waiting; :meth:`RedisRuns.save_run` is the plain, blocking write.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

import redis

from celery_taskengine._engine.observers import RunObserver
from celery_taskengine._engine.task_run import TaskRun, run_from_document
from celery_taskengine._store.protocol import LocalRecorder
from celery_taskengine._store.run_document import encode_run
from celery_taskengine._store.run_index import RunIndex, list_indexed
from celery_taskengine._store.task_meta import px

__all__ = ["RedisRuns"]

logger = logging.getLogger(__name__)


class RedisRuns:
    """Run records on the store's Redis database."""

    client: redis.Redis
    run_expires: float | None
    _index: RunIndex
    _index_script: Any
    _clock: Callable[[], float]
    key_for: Callable[..., str]
    call: Callable[..., Any]
    replica_wait: Callable[[], tuple[Any, ...] | None]

    def save_run(self, run: TaskRun) -> None:
        """Write the run's JSON document, living ``run_expires`` seconds, and index it (one
        round trip; an outcome is confirmed by a replica, see replicas)."""
        self._save_run(run, None)

    def save_run_with_task_meta(
        self, run: TaskRun, meta_key: str, meta: bytes | str, meta_px: int | None
    ) -> None:
        """The run record and Celery's task meta for it in one round trip: for a backend that
        talks to Redis through this store's client (see :meth:`rides_with`)."""
        self._save_run(run, (meta_key, meta, meta_px))

    def _save_run(self, run: TaskRun, meta: tuple[str, bytes | str, int | None] | None) -> None:
        document = encode_run(run)
        ms = px(self.run_expires)
        redis_key = self.key_for("run", run.id)
        keys, args = self.index_keys_and_args(run)
        state = run.state
        outcome = state is not None and (state.is_final() or state.is_scheduled())
        wait = self.replica_wait() if outcome else None  # see replicas

        def save() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.set(redis_key, document, px=None if ms == "0" else int(ms))
            self._index_script(keys=keys, args=args, client=pipe)
            if meta is not None:
                pipe.set(meta[0], meta[1], px=meta[2])
            if wait is not None:
                pipe.execute_command(*wait)  # type: ignore[no-untyped-call]
            pipe.execute()

        self.call(save, "saving its run", run.id)

    def index_keys_and_args(self, run: TaskRun) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of :data:`~celery_taskengine._store.run_index.INDEX_LUA` for
        ``run`` as it is now (for writers of run records in scripts of their own)."""
        return self._index.for_run(run, self._clock())

    def load_run(self, run_id: str) -> TaskRun | None:
        """The run record for ``run_id``; ``None`` when unknown, or malformed (with a warning)."""
        redis_key = self.key_for("run", run_id)
        raw = self.call(lambda: self.client.get(redis_key), "loading its run", run_id)
        if raw is None:
            return None
        return self._decode_run(run_id, raw)

    def iter_runs(self, limit: int) -> list[TaskRun]:
        """Up to ``limit`` runs, the most recently active first (read along the run index)."""
        return self.list_runs(limit)

    def list_runs(
        self, limit: int, *, task: str | None = None, state: str | None = None
    ) -> list[TaskRun]:
        """Up to ``limit`` matching runs, newest first, read along the run index (see
        run_index): the cost follows ``limit``, not the number of runs."""
        if limit <= 0:
            return []

        def listing() -> list[TaskRun]:
            run_key = functools.partial(self.key_for, "run")
            args = (self._index, run_key, self._decode_run, limit, task, state)
            return list_indexed(self.client, *args)

        runs: list[TaskRun] = self.call(listing, "listing runs")
        return runs

    def worker_observers(self, app: Any, delivery: Any) -> list[RunObserver]:
        """Worker runs' records go on the record channel (see worker_records)."""
        from celery_taskengine._store.worker_records import delivery_observers

        store: Any = self
        return delivery_observers(app, store, delivery)

    def rides_with(self, backend: Any) -> bool:
        """Whether ``backend`` talks to Redis through this store's own client."""
        return getattr(backend, "client", None) is self.client

    def local_recorder(self) -> LocalRecorder:
        """Local runs' records are written behind the caller (see local_records)."""
        from celery_taskengine._store.local_records import recorder_for

        store: Any = self
        return recorder_for(store)

    def _decode_run(self, run_id: str, raw: bytes | str) -> TaskRun | None:
        try:
            return run_from_document(json.loads(raw))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError too
            logger.warning("Ignoring malformed run record %r: %s", run_id, exc)
            return None
