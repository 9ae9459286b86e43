"""The shared store: cached results, locks and run records on a Celery app's Redis backend.

Every producer and worker of an app sees the same records. Keys live in their own namespace,
so they never meet Celery's (``celery-task-meta-…``) nor another app's on the same database::

    <global_keyprefix>cte:<namespace>:cache:<transaction key>   an encoded ResultRecord
    <global_keyprefix>cte:<namespace>:lock:<transaction key>    the holder id, with a PX ttl
    <global_keyprefix>cte:<namespace>:run:<run id>              a TaskRun JSON document
    <global_keyprefix>cte:<namespace>:items:<run id>            a generator task's items (a stream)

``global_keyprefix`` is the backend's (``result_backend_transport_options``), normalised as
Celery does; ``namespace`` is the app setting ``taskengine_namespace`` (default ``"default"``),
which lets two apps share one Redis database without sharing caches. Each operation is one
Redis round trip, tried again through an outage as long as Celery's backend retries its writes
(:mod:`~celery_taskengine._store.retrying`), then failing with :class:`StoreUnavailableError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import redis

from celery_taskengine._store.cache_codec import (
    accept_for_app,
    decode_record,
    encode_record,
    normalize_accept,
)
from celery_taskengine._store.connections import DEFAULT_MAX_CONNECTIONS, EnginePool
from celery_taskengine._store.early_read import EarlyRead, EarlyReads
from celery_taskengine._store.protocol import (
    ResultRecord,
)
from celery_taskengine._store.redis_claims import ClaimStore
from celery_taskengine._store.redis_locks import RELEASE_LUA, RedisLocks, milliseconds
from celery_taskengine._store.redis_runs import RedisRuns
from celery_taskengine._store.redis_streams import RedisStreams
from celery_taskengine._store.replicas import (
    DEFAULT_REPLICA_ACKS,
    ReplicaAcks,
    replica_acks_setting,
)
from celery_taskengine._store.retrying import (
    OUTAGE_ERRORS,
    REFUSAL_ERRORS,
    Patience,
    patience_from_policy,
)
from celery_taskengine._store.run_index import INDEX_LUA, RunIndex
from celery_taskengine._store.settings import (
    DEFAULT_NAMESPACE,
    DEFAULT_RUN_EXPIRES,
    count_setting,
    run_expiry_seconds,
)
from celery_taskengine.errors import (
    ConfigurationError,
    StorePermissionError,
    StoreUnavailableError,
)

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["DEFAULT_NAMESPACE", "DEFAULT_RUN_EXPIRES", "RedisStore", "run_expiry_seconds"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

Kind = Literal["cache", "lock", "run", "items", "claim", "revoked"]

_SCAN_BATCH = 500
#: A cache read's failures that the store's own handling turns into its errors.
_READ_AGAIN: tuple[type[Exception], ...] = (*OUTAGE_ERRORS, redis.exceptions.NoPermissionError)


class RedisStore(ClaimStore, RedisLocks, RedisRuns, RedisStreams):
    """A :class:`~celery_taskengine._store.protocol.ResultStore` on one Redis database.

    Use :meth:`for_app` to get one on a Celery app's result backend. ``accept`` lists the
    serializers records may use (JSON only by default); ``run_expires`` is the lifetime of run
    records in seconds (``None``: forever); ``url`` names the server in error messages and must
    not contain a password; ``clock`` gives wall-clock seconds for record timestamps;
    ``patience`` is how long an operation waits out a Redis outage (default: not at all).
    ``max_connections`` bounds the connections the engine keeps of its own (see
    :mod:`~celery_taskengine._store.connections`); ``replica_acks`` how many replicas must
    have a run's outcome (see :mod:`~celery_taskengine._store.replicas`).
    """

    shared: bool = True
    supports_locking: bool = True
    claims: bool = True

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        key_prefix: str = "",
        accept: Iterable[str] | None = None,
        run_expires: float | None = DEFAULT_RUN_EXPIRES,
        url: str | None = None,
        clock: Callable[[], float] = time.time,
        patience: Patience | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        replica_acks: int = DEFAULT_REPLICA_ACKS,
    ) -> None:
        if not namespace or ":" in namespace:
            raise ConfigurationError(
                f"taskengine_namespace must be a non-empty string without ':', got {namespace!r}"
            )
        self.client = client
        self.namespace = namespace
        self.accept = normalize_accept(accept)
        self.run_expires = run_expires if run_expires and run_expires > 0 else None
        self.url = url or _describe_client(client)
        self._prefix = f"{key_prefix}cte:{namespace}:"
        self._clock = clock
        self.patience = patience or Patience()
        self._release = client.register_script(RELEASE_LUA)
        self._index = self.run_index = RunIndex(self._prefix, self.run_expires)
        self._index_script = client.register_script(INDEX_LUA)
        self._renew: Any = None  # on connections of its own, made by the first renewal
        #: Connections kept between uses (early reads, run records): never Celery's pool's.
        self.connections = EnginePool(client, max_connections)
        #: Replicas that must have a run's outcome before it counts as written (see replicas).
        self.replica_acks = replica_acks
        self._early_reads = EarlyReads(self)

    @classmethod
    def for_app(cls, app: Celery, backend: Any = None) -> RedisStore:
        """The store on ``app``'s Redis result backend, sharing its client and connections.

        ``backend``: another Celery Redis backend object to keep the records on (the app's
        ``taskengine_store`` setting), built by Celery from a URL as its own would be.
        Honours the backend's ``global_keyprefix``, the app's ``taskengine_namespace``,
        ``result_accept_content`` (else ``accept_content``), ``result_expires``, the
        backend's ``retry_policy`` (how long operations wait out an outage) and
        ``taskengine_store_max_connections`` (connections the engine keeps, per process) and
        ``taskengine_replica_acks`` (replicas an outcome waits for, see replicas).
        """
        backend = app.backend if backend is None else backend
        options = app.conf.get("result_backend_transport_options") or {}
        return cls(
            backend.client,
            namespace=app.conf.get("taskengine_namespace") or DEFAULT_NAMESPACE,
            key_prefix=_global_prefix(options.get("global_keyprefix")),
            accept=accept_for_app(app),
            run_expires=run_expiry_seconds(app.conf.get("result_expires")),
            url=backend.as_uri(),
            patience=patience_from_policy(getattr(backend, "retry_policy", None)),
            max_connections=count_setting(
                app.conf, "taskengine_store_max_connections", DEFAULT_MAX_CONNECTIONS
            ),
            replica_acks=replica_acks_setting(app.conf),
        )

    def replica_wait(self) -> tuple[Any, ...] | None:
        """The ``WAIT`` that follows an outcome's writes (see replicas), or ``None``."""
        return ReplicaAcks.of(self.client, self.replica_acks).wait_command()

    def key_for(self, kind: Kind, name: str) -> str:
        """The Redis key holding the cache record, lock or run record called ``name``."""
        return f"{self._prefix}{kind}:{name}"

    # -- cached results ------------------------------------------------------------------

    def read(self, key: str) -> ResultRecord | None:
        """The committed record, or ``None`` when missing, expired, corrupt or foreign.

        The envelope's ``expires_at`` decides expiry; Redis' own PX expiry only frees memory.
        """
        redis_key = self.key_for("cache", key)
        try:  # tried once before any retry machinery: this is every cache hit's path
            raw = self.client.get(redis_key)
        except _READ_AGAIN:
            raw = self.call(lambda: self.client.get(redis_key), f"reading cache record {key!r}")
        return self.record_from(raw, key)

    def start_read(self, key: str) -> EarlyRead:
        """Send the ``GET`` of :meth:`read` now; :meth:`EarlyRead.result` reads the answer.

        The engine asks before it records Running, so the round trip overlaps that work.
        """
        return self._early_reads.start(key)

    def record_from(self, raw: bytes | str | None, key: str) -> ResultRecord | None:
        """The record a ``GET`` of ``key`` answered (as :meth:`read` gives it)."""
        if raw is None:
            return None
        try:
            record = decode_record(raw, self.accept, key=key)
        except ValueError as exc:
            logger.warning("Ignoring unreadable cache record under key %r: %s", key, exc)
            return None
        if record.expires_at is not None and record.expires_at <= self._now():
            return None
        return record

    def exists(self, key: str) -> bool:
        """Whether a record is stored under ``key`` (Redis drops expired ones itself)."""
        redis_key = self.key_for("cache", key)
        return bool(self.call(lambda: self.client.exists(redis_key), f"cache record {key!r}"))

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

        One ``SET … PX``. The value is encoded first, so a :class:`SerializationError` writes
        nothing. ``expires_in <= 0`` is a record already expired: the key is deleted instead.
        """
        now = self._now()
        expires_at = None if expires_in is None else now + timedelta(seconds=expires_in)
        raw = encode_record(
            key,
            value,
            serializer=serializer,
            accept=self.accept,
            created_at=now,
            expires_at=expires_at,
            task_name=task_name,
        )
        redis_key = self.key_for("cache", key)

        def store() -> None:
            if self._fence is not None:  # a delivery's commit: only while it holds its claim
                self._write_fenced_record(redis_key, raw, _px_or_delete(expires_in))
            elif expires_in is None:
                self.client.set(redis_key, raw)
            elif expires_in <= 0:
                self.client.delete(redis_key)
            else:
                self.client.set(redis_key, raw, px=milliseconds(expires_in))

        self.call(store, f"writing cache record {key!r}")

    def delete(self, key: str) -> bool:
        """Remove the record; whether one was there."""
        redis_key = self.key_for("cache", key)
        return bool(self.call(lambda: self.client.delete(redis_key), f"deleting {key!r}"))

    def iter_keys(self, prefix: str = "") -> list[str]:
        """The transaction keys of stored records starting with ``prefix``, sorted (SCAN)."""
        start = len(self.key_for("cache", ""))
        return sorted(_text(name)[start:] for name in self._scan("cache", prefix))

    # -- internals -----------------------------------------------------------------------

    def _scan(self, kind: Kind, prefix: str) -> list[bytes | str]:
        pattern = _glob_escape(self.key_for(kind, prefix)) + "*"
        return self.call(
            lambda: list(self.client.scan_iter(match=pattern, count=_SCAN_BATCH)), "a scan"
        )

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), timezone.utc)

    def call(
        self, operation: Callable[[], T], what: str, run_id: str = "", patience: Any = None
    ) -> T:
        """``operation()`` (Redis calls on this store's server), waiting out an outage for
        :attr:`patience` (and the refusals of a failover or a full server: see retrying);
        :class:`StoreUnavailableError` once it is spent. Also for the
        store's collaborators (claims, channels) that make Redis calls of their own."""
        try:
            return (patience or self.patience).call(operation, what=what, run_id=run_id)
        except OUTAGE_ERRORS as exc:
            raise self._unavailable(exc) from exc
        except redis.exceptions.NoPermissionError as exc:
            raise StorePermissionError(
                f"{run_id + ': ' if run_id else ''}the Redis user of {self.url} may not "
                f"run what the engine needs for {what} on its keys ({self._prefix}*): {exc}. "
                f"Grant it ~{self._prefix}* and the commands listed under 'ACL users' in the "
                f"README's Deployments section"
            ) from exc
        except REFUSAL_ERRORS as exc:  # OOM or READONLY for longer than the policy waits
            raise StoreUnavailableError(
                f"{run_id + ': ' if run_id else ''}Redis result backend at {self.url} refused "
                f"{what}: {type(exc).__name__}: {exc}"
            ) from exc

    def _unavailable(self, exc: Exception) -> StoreUnavailableError:
        return StoreUnavailableError(f"Redis result backend at {self.url} is unavailable: {exc}")


def _global_prefix(prefix: Any) -> str:
    """Celery's rule: a non-empty prefix ends in one of ``:_-.``, else ``_`` is appended."""
    if not prefix:
        return ""
    text = str(prefix)
    return text if text[-1] in ":_-." else f"{text}_"


def _px_or_delete(expires_in: float | None) -> str:
    """A fenced write's lifetime argument: ms, ``'0'`` for none, ``'-'`` to delete."""
    if expires_in is None:
        return "0"
    return "-" if expires_in <= 0 else str(milliseconds(expires_in))


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def _describe_client(client: redis.Redis) -> str:
    """A password-free URL for ``client``'s server, for error messages."""
    kwargs: dict[str, Any] = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    host = kwargs.get("host", "localhost")
    return f"redis://{host}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
