"""The shared store on a SQL database (PostgreSQL, MariaDB/MySQL, SQLite), through SQLAlchemy 2.

For deployments whose result backend is a database (``db+postgresql://...``) or that name one
in ``taskengine_store``. Cached records keep the envelope every store uses (see
:mod:`~celery_taskengine._store.cache_codec`); run records keep the same JSON document as on
Redis. Locks, delivery claims and streams are parts of their own (sql_locks, sql_claims,
sql_streams). Each operation is one short transaction; a database that cannot be reached
surfaces as :class:`StoreUnavailableError`.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, delete, event, or_, select
from sqlalchemy import exc as sa_exc

from celery_taskengine._engine.observers import RunObserver
from celery_taskengine._engine.task_run import TaskRun, run_from_document
from celery_taskengine._store import sql_schema as schema
from celery_taskengine._store.cache_codec import decode_record, encode_record, normalize_accept
from celery_taskengine._store.protocol import LocalRecorder, ResultRecord
from celery_taskengine._store.run_document import encode_run
from celery_taskengine._store.run_filters import short_task_name, squash
from celery_taskengine._store.settings import DEFAULT_NAMESPACE, DEFAULT_RUN_EXPIRES
from celery_taskengine._store.sql_claims import SqlClaims
from celery_taskengine._store.sql_early_read import SqlEarlyRead, sends_early
from celery_taskengine._store.sql_locks import SqlLocks
from celery_taskengine._store.sql_raw_read import RawReads
from celery_taskengine._store.sql_streams import SqlStreams
from celery_taskengine._store.sql_support import (
    LOAD_RUN,
    READ_RECORD,
    TryAgain,
    engines,
    like_escape,
    may_succeed_again,
    reconnecting,
    sqlite_wal,
    upsert_many,
    utc,
)
from celery_taskengine._store.write_behind import WriteBehindRecorder
from celery_taskengine.errors import ConfigurationError, StoreUnavailableError

__all__ = ["SqlStore"]

logger = logging.getLogger(__name__)

#: Lapsed rows are deleted after this many writes, so unread keys don't pile up.
_SWEEP_EVERY = 512


class SqlStore(SqlClaims, SqlLocks, SqlStreams):
    """A :class:`~celery_taskengine._store.protocol.ResultStore` on one SQL database.

    ``engine`` is a SQLAlchemy engine (made from a URL by :meth:`from_url`); ``clock`` gives
    wall-clock seconds and decides every expiry. The tables are created on first use unless
    ``create_tables`` is false (schemas managed by migrations: see ``store ddl``).
    """

    shared: bool = True
    supports_locking: bool = True
    #: Set where reads can be sent early (see sql_early_read); the engine looks for it.
    start_read: Callable[[str], SqlEarlyRead]

    def __init__(
        self,
        engine: Engine,
        *,
        reader: Engine | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        accept: Iterable[str] | None = None,
        run_expires: float | None = DEFAULT_RUN_EXPIRES,
        create_tables: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not namespace or ":" in namespace:
            raise ConfigurationError(
                f"taskengine_namespace must be a non-empty string without ':', got {namespace!r}"
            )
        self.engine = engine
        #: Reads go here: connections that autocommit (SQLite's driver begins no
        #: transaction for a SELECT anyway).
        self._reader = reader or engine
        #: Whether reads' connections autocommit (a single statement needs no transaction).
        self._autocommits = self._reader is not engine
        engines.add(self._reader)
        self._raw = RawReads(self._reader)
        self.namespace = namespace
        self.accept = normalize_accept(accept)
        self.run_expires = run_expires if run_expires and run_expires > 0 else None
        self.url = engine.url.render_as_string(hide_password=True)
        self._clock = clock
        self._writes = 0
        self._tables_ready = not create_tables
        self._tables_lock = threading.Lock()
        self._recorder: WriteBehindRecorder | None = None
        engines.add(engine)
        if sends_early(self):  # the engine sends a hit's read before its own work
            self.start_read = functools.partial(SqlEarlyRead, self)

    @classmethod
    def from_url(
        cls, url: str, engine_options: dict[str, Any] | None = None, **kwargs: Any
    ) -> SqlStore:
        """A store on the database at SQLAlchemy ``url`` (``postgresql://``, ``sqlite:///``...)."""
        options = dict(engine_options or {})
        # No ping before each checkout, even where Celery's database_engine_options ask for
        # one (a round trip per operation): a connection the server closed fails its
        # statement, is invalidated, and the operation is made once more (_reconnecting).
        # Every transaction is ended by the store, so no reset on return either.
        options["pool_pre_ping"] = False
        options.setdefault("pool_reset_on_return", None)
        if url.startswith("sqlite"):
            # Two worker processes on one file: wait for the other's write lock.
            options.setdefault("connect_args", {"timeout": 30})
        try:
            engine = create_engine(url, **options)
            reader = None
            if engine.dialect.name == "sqlite":
                event.listen(engine, "connect", sqlite_wal)
            else:  # connections that autocommit from the start: a read is one round trip
                reader = create_engine(url, isolation_level="AUTOCOMMIT", **options)
        except (sa_exc.ArgumentError, ImportError) as exc:  # unknown dialect, missing driver
            raise ConfigurationError(f"cannot use the database at {url!r}: {exc}") from exc
        return cls(engine, reader=reader, **kwargs)

    # -- cached results ------------------------------------------------------------------

    @reconnecting
    def read(self, key: str) -> ResultRecord | None:
        """The committed record, or ``None`` when missing, expired, corrupt or foreign."""
        return self.record_from(self._fetch_one(READ_RECORD, self._live_params(key)), key)

    def record_from(self, raw: bytes | None, key: str) -> ResultRecord | None:
        """The record a read of ``key`` answered (as :meth:`read` gives it)."""
        if raw is None:
            return None
        try:
            record = decode_record(bytes(raw), self.accept, key=key)
        except ValueError as exc:
            logger.warning("Ignoring unreadable cache record under key %r: %s", key, exc)
            return None
        if record.expires_at is not None and record.expires_at <= utc(self._clock()):
            return None
        return record

    def exists(self, key: str) -> bool:
        return self.read(key) is not None

    @reconnecting
    def write(
        self,
        key: str,
        value: Any,
        *,
        serializer: str,
        expires_in: float | None,
        task_name: str | None = None,
    ) -> None:
        """Store ``value`` under ``key`` for ``expires_in`` seconds (``None``: no expiry);
        encoded first, so a :class:`SerializationError` writes nothing."""
        now = self._clock()
        created = utc(now)
        expires_at = None if expires_in is None else created + timedelta(seconds=expires_in)
        raw = encode_record(
            key,
            value,
            serializer=serializer,
            accept=self.accept,
            created_at=created,
            expires_at=expires_at,
            task_name=task_name,
        )
        deadline = None if expires_in is None else now + expires_in
        values = {"value": raw.encode() if isinstance(raw, str) else raw, "expires_at": deadline}
        if self._fence is not None and self._fence.lost:
            return  # another delivery has the run: this attempt commits nothing
        with self._connection(write=True) as conn:
            if not self._fenced(conn):  # a delivery's commit: only while it holds its claim
                return
            if expires_in is not None and expires_in <= 0:  # already expired: deleted
                c = schema.cache.c
                conn.execute(delete(schema.cache).where(self._mine(c), c.key == key))
            else:
                self._upsert(conn, schema.cache, {"key": key}, values)

    @reconnecting
    def delete(self, key: str) -> bool:
        c = schema.cache.c
        with self._connection(write=True) as conn:
            gone = conn.execute(delete(schema.cache).where(self._mine(c), c.key == key))
        return bool(gone.rowcount)

    @reconnecting
    def iter_keys(self, prefix: str = "") -> list[str]:
        """The transaction keys of live records starting with ``prefix``, sorted."""
        c = schema.cache.c
        pattern = like_escape(prefix) + "%"
        query = select(c.key).where(
            self._mine(c), c.key.like(pattern, escape="\\"), self._unexpired(c)
        )
        with self._connection() as conn:
            return sorted(conn.execute(query).scalars())

    # -- run records ---------------------------------------------------------------------

    @reconnecting
    def save_run(self, run: TaskRun) -> None:
        """Write the run's document (one upsert), living ``run_expires`` seconds."""
        values = self._run_values(run)
        with self._connection(write=True) as conn:
            self._upsert(conn, schema.runs, {"run_id": run.id}, values)

    def _run_values(self, run: TaskRun) -> dict[str, Any]:
        now = self._clock()
        state = run.state
        moment = run.state_history[-1].timestamp if run.state_history else None
        return {
            "task_name": run.task_name,
            "task_short": short_task_name(run.task_name),
            "state_type": squash(state.type.value if state is not None else "PENDING"),
            "state_name": squash(state.name if state is not None else "Pending"),
            "updated_at": moment.timestamp() if moment is not None else now,
            "expires_at": None if self.run_expires is None else now + self.run_expires,
            "document": encode_run(run),
        }

    @reconnecting
    def load_run(self, run_id: str) -> TaskRun | None:
        document = self._fetch_one(LOAD_RUN, self._live_params(run_id))
        return None if document is None else self._decode_run(run_id, document)

    def iter_runs(self, limit: int) -> list[TaskRun]:
        return self.list_runs(limit)  # the most recently active first: an index scan

    @reconnecting
    def list_runs(
        self, limit: int, *, task: str | None = None, state: str | None = None
    ) -> list[TaskRun]:
        """Up to ``limit`` matching runs, newest first, read along an index (see
        sql_schema): the cost follows ``limit``, not the number of runs."""
        if limit <= 0:
            return []
        c = schema.runs.c
        conditions = [self._mine(c), self._unexpired(c)]
        if task is not None:
            conditions.append(or_(c.task_name == task, c.task_short == task))
        if state is not None:
            conditions.append(or_(c.state_type == squash(state), c.state_name == squash(state)))
        query = (
            select(c.run_id, c.document)
            .where(*conditions)
            .order_by(c.updated_at.desc())
            .limit(min(limit, 2**31 - 1))
        )
        with self._connection() as conn:
            rows = conn.execute(query).all()
        decoded = (self._decode_run(run_id, document) for run_id, document in rows)
        return [run for run in decoded if run is not None]

    @reconnecting
    def save_runs(self, runs: list[TaskRun]) -> None:
        """Write several runs' documents in one transaction."""
        # In key order, so two batches never wait for each other's rows (no deadlock).
        rows = [{"run_id": run.id, **self._run_values(run)} for run in runs]
        rows.sort(key=lambda row: str(row["run_id"]))
        with self._connection(write=True) as conn:
            upsert_many(conn, schema.runs, self.namespace, ["run_id"], rows)

    def worker_observers(self, app: Any, delivery: Any) -> list[RunObserver]:
        """Worker runs are recorded for about a plain task's commits (see sql_worker_records)."""
        from celery_taskengine._store.sql_worker_records import sql_delivery_observers

        return sql_delivery_observers(app, self, delivery)

    def rides_with(self, backend: Any) -> bool:
        return False

    def local_recorder(self) -> LocalRecorder:
        """Local runs' records are written behind the caller, in batches (see write_behind)."""
        if self._recorder is None:
            self._recorder = WriteBehindRecorder(self.save_runs, self.url)
        return self._recorder

    # -- tables --------------------------------------------------------------------------

    def create_tables(self) -> None:
        """Create the store's tables and indexes where they are missing (``store init``), as
        other processes may be doing at the same moment (see sql_schema.create_missing)."""
        try:
            schema.create_missing(self.engine, may_succeed_again)
        except sa_exc.DBAPIError as exc:  # a dropped connection: the operation is made again
            translated = self._translated(exc)
            if translated is exc:
                raise
            raise translated from exc
        self._tables_ready = True

    def close(self) -> None:  # it opens new connections if used again
        self.engine.dispose()
        if self._reader is not self.engine:
            self._reader.dispose()

    # -- internals -----------------------------------------------------------------------

    def _upsert(
        self, conn: Connection, table: Any, key: dict[str, Any], values: dict[str, Any]
    ) -> None:
        """One row's ``INSERT ... ON CONFLICT UPDATE`` (see sql_support.upsert_many)."""
        upsert_many(conn, table, self.namespace, list(key), [{**key, **values}])

    def _mine(self, c: Any) -> Any:
        return c.namespace == self.namespace

    def _unexpired(self, c: Any) -> Any:
        return or_(c.expires_at.is_(None), c.expires_at > self._clock())

    def _live_params(self, key: str) -> dict[str, Any]:
        return {"namespace": self.namespace, "key": key, "now": self._clock()}

    @contextmanager
    def _connection(self, *, write: bool = False) -> Iterator[Connection]:
        """A transaction for writes, an autocommitted connection for reads (no BEGIN and
        ROLLBACK round trips); the database's connection failures as StoreUnavailableError."""
        if not self._tables_ready:
            self._make_tables()
        try:
            if write:
                with self.engine.begin() as conn:
                    yield conn
            else:
                with self._reader.connect() as conn:
                    yield conn
        except sa_exc.DBAPIError as exc:
            translated = self._translated(exc)
            if translated is exc:
                raise
            raise translated from exc
        if write:
            self._writes += 1
            if self._writes % _SWEEP_EVERY == 0:
                self._sweep()

    def _fetch_one(self, statement: Any, params: dict[str, Any]) -> Any:
        """The one value ``statement`` selects, on an autocommitted connection: a cache hit's
        read, with no more around it than its round trip."""
        if not self._tables_ready:
            self._make_tables()
        try:
            return self._raw.fetch_one(statement, params)
        except sa_exc.DBAPIError as exc:
            translated = self._translated(exc)
            if translated is exc:
                raise
            raise translated from exc

    def _make_tables(self) -> None:
        with self._tables_lock:
            if not self._tables_ready:
                self.create_tables()

    def _translated(self, exc: sa_exc.DBAPIError) -> Exception:
        """The database's failure as the store says it (see _connection)."""
        if may_succeed_again(exc):
            return TryAgain(f"SQL store at {self.url}: {exc.orig}")
        if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
            return self._unavailable(exc)
        return exc

    def _sweep(self) -> None:
        """Delete lapsed rows (reads ignore them already)."""
        now = self._clock()
        with self.engine.begin() as conn:
            for table in schema.METADATA.sorted_tables:  # every table has expires_at
                c = table.c
                conn.execute(delete(table).where(self._mine(c), c.expires_at < now))

    def _decode_run(self, run_id: str, document: str) -> TaskRun | None:
        try:
            return run_from_document(json.loads(document))
        except (ValueError, RecursionError, KeyError, TypeError) as exc:
            logger.warning("Ignoring malformed run record %r: %s", run_id, exc)
        return None

    def _unavailable(self, exc: Exception) -> StoreUnavailableError:
        return StoreUnavailableError(f"SQL store at {self.url} is unavailable: {exc}")
