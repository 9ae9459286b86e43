"""The shared store on a SQL database (PostgreSQL, MariaDB/MySQL, SQLite), through SQLAlchemy 2.

For deployments whose result backend is a database (``db+postgresql://...``) or that name one
in ``taskengine_store``. Cached records keep the envelope every store uses (see
:mod:`~celery_taskengine._store.record_codec`); run records keep the same JSON document as on
Redis. Locks are rows taken by a plain ``INSERT`` (the primary key refuses a second holder),
after deleting a lapsed one, so they work the same on every database, and a holder that died
loses its lock at ``expires_at``. Each operation is one short transaction; a database that
cannot be reached surfaces as :class:`StoreUnavailableError`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, and_, create_engine, delete, or_, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import mysql, postgresql, sqlite

from celery_taskengine._store import sql_schema as schema
from celery_taskengine._store.protocol import ItemBatch, LocalRecorder, ResultRecord
from celery_taskengine._store.record_codec import decode_record, encode_record, normalize_accept
from celery_taskengine._store.redis_store import DEFAULT_NAMESPACE, DEFAULT_RUN_EXPIRES
from celery_taskengine._store.run_document import encode_run
from celery_taskengine._store.run_filters import short_task_name, squash
from celery_taskengine.errors import ConfigurationError, StoreUnavailableError
from celery_taskengine.states import StateType
from celery_taskengine.task_run import TaskRun, run_from_document

if TYPE_CHECKING:
    from celery_taskengine.states import State

__all__ = ["SqlStore"]

logger = logging.getLogger(__name__)

#: Lapsed rows are deleted after this many writes, so unread keys don't pile up.
_SWEEP_EVERY = 512
#: How often a blocking :meth:`SqlStore.read_items` asks again.
_ITEM_POLL_SECONDS = 0.05
#: The states a local run shares with other processes (as on Redis).
_WORTH_SHARING = frozenset(
    {
        StateType.SCHEDULED,
        StateType.COMPLETED,
        StateType.FAILED,
        StateType.CANCELLED,
        StateType.CRASHED,
    }
)


class SqlStore:
    """A :class:`~celery_taskengine._store.protocol.ResultStore` on one SQL database.

    ``engine`` is a SQLAlchemy engine (made from a URL by :meth:`from_url`); ``clock`` gives
    wall-clock seconds and decides every expiry. The tables are created on first use unless
    ``create_tables`` is false (schemas managed by migrations: see ``store ddl``).
    """

    shared: bool = True
    supports_locking: bool = True

    def __init__(
        self,
        engine: Engine,
        *,
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
        self.namespace = namespace
        self.accept = normalize_accept(accept)
        self.run_expires = run_expires if run_expires and run_expires > 0 else None
        self.url = engine.url.render_as_string(hide_password=True)
        self._clock = clock
        self._writes = 0
        self._tables_ready = not create_tables
        self._tables_lock = threading.Lock()
        _engines.add(engine)

    @classmethod
    def from_url(
        cls, url: str, engine_options: dict[str, Any] | None = None, **kwargs: Any
    ) -> SqlStore:
        """A store on the database at SQLAlchemy ``url`` (``postgresql://``, ``sqlite:///``...)."""
        options = dict(engine_options or {})
        options.setdefault("pool_pre_ping", True)
        if url.startswith("sqlite"):
            # Two worker processes on one file: wait for the other's write lock.
            options.setdefault("connect_args", {"timeout": 30})
        try:
            engine = create_engine(url, **options)
        except (sa_exc.ArgumentError, ImportError) as exc:  # unknown dialect, missing driver
            raise ConfigurationError(f"cannot use the database at {url!r}: {exc}") from exc
        return cls(engine, **kwargs)

    # -- cached results ------------------------------------------------------------------

    def read(self, key: str) -> ResultRecord | None:
        """The committed record, or ``None`` when missing, expired, corrupt or foreign."""
        c = schema.cache.c
        with self._connection() as conn:
            raw = conn.execute(
                select(c.value).where(self._live(c, key=key, column=c.key))
            ).scalar_one_or_none()
        if raw is None:
            return None
        try:
            record = decode_record(bytes(raw), self.accept, key=key)
        except ValueError as exc:
            logger.warning("Ignoring unreadable cache record under key %r: %s", key, exc)
            return None
        if record.expires_at is not None and record.expires_at <= self._now():
            return None
        return record

    def exists(self, key: str) -> bool:
        return self.read(key) is not None

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
        created = _utc(now)
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
        if expires_in is not None and expires_in <= 0:
            self.delete(key)
            return
        deadline = None if expires_in is None else now + expires_in
        values = {"value": raw.encode() if isinstance(raw, str) else raw, "expires_at": deadline}
        with self._connection(write=True) as conn:
            self._upsert(conn, schema.cache, {"key": key}, values)

    def delete(self, key: str) -> bool:
        c = schema.cache.c
        with self._connection(write=True) as conn:
            gone = conn.execute(delete(schema.cache).where(self._mine(c), c.key == key))
        return bool(gone.rowcount)

    def iter_keys(self, prefix: str = "") -> list[str]:
        """The transaction keys of live records starting with ``prefix``, sorted."""
        c = schema.cache.c
        pattern = _like_escape(prefix) + "%"
        query = select(c.key).where(
            self._mine(c), c.key.like(pattern, escape="\\"), self._unexpired(c)
        )
        with self._connection() as conn:
            return sorted(conn.execute(query).scalars())

    # -- locks ---------------------------------------------------------------------------

    def acquire_lock(self, key: str, holder: str, ttl: float) -> bool:
        """Delete a lapsed lock on ``key``, then ``INSERT`` ours: the primary key lets one
        holder in. Never blocks; not re-entrant."""
        _check_ttl(ttl)
        c = schema.locks.c
        now = self._clock()
        try:
            with self._connection(write=True) as conn:
                conn.execute(
                    delete(schema.locks).where(self._mine(c), c.key == key, c.expires_at <= now)
                )
            with self._connection(write=True) as conn:
                conn.execute(
                    schema.locks.insert().values(
                        namespace=self.namespace, key=key, holder=holder, expires_at=now + ttl
                    )
                )
        except sa_exc.IntegrityError:
            return False
        return True

    def renew_lock(self, key: str, holder: str, ttl: float) -> bool:
        _check_ttl(ttl)
        c = schema.locks.c
        now = self._clock()
        with self._connection(write=True) as conn:
            renewed = conn.execute(
                update(schema.locks)
                .where(self._mine(c), c.key == key, c.holder == holder, c.expires_at > now)
                .values(expires_at=now + ttl)
            )
        return bool(renewed.rowcount)

    def release_lock(self, key: str, holder: str) -> None:
        c = schema.locks.c
        with self._connection(write=True) as conn:
            conn.execute(
                delete(schema.locks).where(self._mine(c), c.key == key, c.holder == holder)
            )

    def lock_holder(self, key: str) -> str | None:
        c = schema.locks.c
        with self._connection() as conn:
            holder = conn.execute(
                select(c.holder).where(self._mine(c), c.key == key, c.expires_at > self._clock())
            ).scalar_one_or_none()
        return None if holder is None else str(holder)

    # -- run records ---------------------------------------------------------------------

    def save_run(self, run: TaskRun) -> None:
        """Write the run's document (one upsert), living ``run_expires`` seconds."""
        now = self._clock()
        state = run.state
        values = {
            "task_name": run.task_name,
            "task_short": short_task_name(run.task_name),
            "state_type": squash(state.type.value if state is not None else "PENDING"),
            "state_name": squash(state.name if state is not None else "Pending"),
            "updated_at": now,
            "expires_at": None if self.run_expires is None else now + self.run_expires,
            "document": encode_run(run),
        }
        with self._connection(write=True) as conn:
            self._upsert(conn, schema.runs, {"run_id": run.id}, values)

    def load_run(self, run_id: str) -> TaskRun | None:
        c = schema.runs.c
        with self._connection() as conn:
            document = conn.execute(
                select(c.document).where(self._live(c, key=run_id, column=c.run_id))
            ).scalar_one_or_none()
        return None if document is None else self._decode_run(run_id, document)

    def iter_runs(self, limit: int) -> list[TaskRun]:
        """Up to ``limit`` runs, the most recently active first (an index scan of ``limit``)."""
        return self.list_runs(limit)

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

    def local_recorder(self) -> LocalRecorder:
        """Local runs save their record at the states other processes care about."""
        return self._record_local_state

    def _record_local_state(self, run: TaskRun, state: State) -> None:
        first_running = state.type is StateType.RUNNING and run.run_count == 1
        if first_running or state.type is StateType.PENDING or state.type in _WORTH_SHARING:
            self.save_run(run)

    # -- revokes and generator items -----------------------------------------------------

    def mark_revoked(self, run_id: str) -> None:
        expires = self._clock() + (self.run_expires or DEFAULT_RUN_EXPIRES)
        with self._connection(write=True) as conn:
            self._upsert(conn, schema.revoked, {"run_id": run_id}, {"expires_at": expires})

    def is_revoked(self, run_id: str) -> bool:
        c = schema.revoked.c
        with self._connection() as conn:
            found = conn.execute(
                select(c.run_id).where(self._mine(c), c.run_id == run_id, self._unexpired(c))
            ).first()
        return found is not None

    def append_item(self, run_id: str, item: bytes) -> None:
        self._add_entry(run_id, item)

    def end_items(self, run_id: str) -> None:
        self._add_entry(run_id, None)

    def read_items(self, run_id: str, after: str, *, count: int, block: float) -> ItemBatch:
        """Entries after id ``after`` (``"<row id>-0"``), polled while ``block`` lasts."""
        c = schema.items.c
        start = int(after.split("-")[0])
        query = (
            select(c.id, c.item)
            .where(self._mine(c), c.run_id == run_id, c.id > start)
            .order_by(c.id)
            .limit(count)
        )
        deadline = time.monotonic() + max(block, 0.0)
        while True:
            with self._connection() as conn:
                rows = conn.execute(query).all()
            if rows or time.monotonic() >= deadline:
                return [
                    (f"{row_id}-0", None if item is None else bytes(item)) for row_id, item in rows
                ]
            time.sleep(min(_ITEM_POLL_SECONDS, max(0.0, deadline - time.monotonic())))

    # -- tables --------------------------------------------------------------------------

    def create_tables(self) -> None:
        """Create the store's tables and indexes where they are missing (``store init``)."""
        try:
            schema.METADATA.create_all(self.engine, checkfirst=True)
        except sa_exc.OperationalError as exc:
            if not _already_exists(exc):  # another process created them meanwhile
                raise self._unavailable(exc) from exc
        self._tables_ready = True

    # -- internals -----------------------------------------------------------------------

    def _add_entry(self, run_id: str, item: bytes | None) -> None:
        expires = None if self.run_expires is None else self._clock() + self.run_expires
        row = {"namespace": self.namespace, "run_id": run_id, "item": item, "expires_at": expires}
        with self._connection(write=True) as conn:
            conn.execute(schema.items.insert().values(**row))

    def _upsert(
        self, conn: Connection, table: Any, key: dict[str, Any], values: dict[str, Any]
    ) -> None:
        """``INSERT ... ON CONFLICT UPDATE`` in the database's own spelling (one statement)."""
        row = {"namespace": self.namespace, **key, **values}
        name = conn.dialect.name
        if name == "postgresql":
            pg = postgresql.insert(table).values(**row)
            conn.execute(pg.on_conflict_do_update(index_elements=["namespace", *key], set_=values))
        elif name in ("mysql", "mariadb"):
            my = mysql.insert(table).values(**row)
            conn.execute(my.on_duplicate_key_update(**values))
        elif name == "sqlite":
            lite = sqlite.insert(table).values(**row)
            conn.execute(
                lite.on_conflict_do_update(index_elements=["namespace", *key], set_=values)
            )
        else:
            raise ConfigurationError(f"the SQL store does not support {name!r} databases")

    def _mine(self, c: Any) -> Any:
        return c.namespace == self.namespace

    def _unexpired(self, c: Any) -> Any:
        return or_(c.expires_at.is_(None), c.expires_at > self._clock())

    def _live(self, c: Any, *, key: str, column: Any) -> Any:
        return and_(self._mine(c), column == key, self._unexpired(c))

    @contextmanager
    def _connection(self, *, write: bool = False) -> Iterator[Connection]:
        """One transaction; the database's connection failures as StoreUnavailableError."""
        if not self._tables_ready:
            with self._tables_lock:
                if not self._tables_ready:
                    self.create_tables()
        try:
            with self.engine.begin() as conn:
                yield conn
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            raise self._unavailable(exc) from exc
        if write:
            self._writes += 1
            if self._writes % _SWEEP_EVERY == 0:
                self._sweep()

    def _sweep(self) -> None:
        """Delete lapsed rows (reads ignore them already)."""
        now = self._clock()
        with self.engine.begin() as conn:
            for table in (schema.cache, schema.runs, schema.items, schema.revoked, schema.locks):
                c = table.c
                conn.execute(
                    delete(table).where(
                        self._mine(c), c.expires_at.is_not(None), c.expires_at < now
                    )
                )

    def _decode_run(self, run_id: str, document: str) -> TaskRun | None:
        try:
            return run_from_document(json.loads(document))
        except (ValueError, RecursionError, KeyError, TypeError) as exc:
            logger.warning("Ignoring malformed run record %r: %s", run_id, exc)
            return None

    def _now(self) -> datetime:
        return _utc(self._clock())

    def _unavailable(self, exc: Exception) -> StoreUnavailableError:
        return StoreUnavailableError(f"SQL store at {self.url} is unavailable: {exc}")


#: Every SQL store's engine in this process (forgotten with its store).
_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _forget_parent_connections() -> None:
    """In a forked child: new connections, leaving the parent's sockets to the parent."""
    for engine in list(_engines):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_parent_connections)


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


def _check_ttl(ttl: float) -> None:
    if not ttl > 0:
        raise ValueError(f"lock ttl must be a positive number of seconds, got {ttl!r}")


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _already_exists(exc: Exception) -> bool:
    return "already exists" in str(exc).lower()
