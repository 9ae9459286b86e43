"""Worker run records written without waiting: riding on Celery's connection, or on one of ours.

Every time a Celery worker wakes Redis costs CPU (the client, the server's event loop, context
switches), and a plain Celery task makes about eight round trips; recording a run's Running and
final states with blocking writes cost a fifth of plain-Celery throughput. So:

``RecordChannel.send(..., piggyback=True)``
    In a single-threaded worker process (a prefork child, the solo CLI worker) the commands are
    queued (``MSG_MORE``, Linux) on the connection the result backend's pool hands out next:
    Celery's own next backend command, the read it makes before storing the task's result, is
    sent on that connection and carries them in the same packet. The connection is hooked so
    that our replies are read first, before Celery reads its own: every error is seen (and
    logged with the run id), and no ``CLIENT REPLY SKIP`` is needed to keep replies in order.
:class:`~._store.record_writer.RecordWriter` (``RecordChannel.writer``)
    Elsewhere (the threads and gevent pools, ``async def`` tasks on the loop thread, in-process
    workers) a delivery writes on a connection of the engine pool: sent without waiting, every
    reply read before Celery stores the task's result, so every error is seen.

Either way one run's writes travel on one connection, in order, and a run's final record
reaches Redis before Celery stores the task's result: when ``AsyncResult.get()`` returns, the
record is there.

Writes queued for Celery's next command are kept until their replies are read. If the
connection breaks first, or Redis refuses them for a while (OOM, READONLY, NOPERM: see
retrying), they become *orphans*, sent again (in order, superseded by any newer write of the
same record) before this channel's next write and when the delivery ends
(:meth:`RecordChannel.resend_orphans`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import redis

from celery_taskengine._store.connections import EnginePool
from celery_taskengine._store.record_writer import RecordWriter, patiently
from celery_taskengine._store.retrying import REFUSAL_ERRORS
from celery_taskengine._store.wire import (
    DOWN,
    MSG_MORE,
    Command,
    checkout,
    dropped,
    pack,
    refusal,
    send,
)
from celery_taskengine.errors import StoreUnavailableError

__all__ = ["RecordChannel"]

logger = logging.getLogger(__name__)


class RecordChannel:
    """Run records to ``client``'s server: on its pool's next connection, or the engine's."""

    #: Whether any channel of this process may have orphans (checked after every delivery).
    orphaned: ClassVar[bool] = False

    def __init__(
        self, client: redis.Redis, *, patience: float = 0.0, pool: EnginePool | None = None
    ) -> None:
        self.client = client
        #: Seconds a write is retried while Redis does not answer (as Celery retries its own).
        self.patience = patience
        self.pool = pool if pool is not None else EnginePool(client)
        #: Record key -> writes whose connection broke before their replies were read.
        self._orphans: dict[str, list[Command]] = {}
        self._orphans_lock = threading.Lock()

    @property
    def has_orphans(self) -> bool:
        return bool(self._orphans)

    def writer(self, run_id: str) -> RecordWriter:
        """A writer for one delivery of run ``run_id`` (see the module docstring)."""
        return RecordWriter(self.client, self.pool, run_id, patience=self.patience)

    def send(self, *commands: Command, key: str = "", piggyback: bool = False) -> None:
        """Send ``commands`` (writes of record ``key``) in order. ``piggyback``: queue them
        for the pool's next command, their replies read before its own (see above); otherwise
        they are written on an engine connection and confirmed. While Redis does not answer
        they are retried for ``patience`` seconds, then :class:`StoreUnavailableError`."""
        if self._orphans:
            self._supersede(key)
            self.resend_orphans()
        if not piggyback or not MSG_MORE:
            self.send_blocking(*commands, key=key, piggyback=piggyback)
            return
        try:
            self._send_on_next(list(commands), key)
        except DOWN:
            patiently(lambda: self._pipeline(commands), self.patience, before_each=_nothing)

    def send_blocking(self, *commands: Command, key: str = "", piggyback: bool = False) -> None:
        """Send ``commands`` (writes of record ``key``) and wait until Redis has run them,
        after all this thread queued before on the same channel; retried as :meth:`send` is.
        Raises :class:`StoreUnavailableError` if Redis refused one."""
        if self._orphans:
            self._supersede(key)
            self.resend_orphans()
        if piggyback:  # the pool's next connection: the one queued on
            patiently(lambda: self._pipeline(commands), self.patience, before_each=_nothing)
            return
        writer = self.writer(key)
        writer.send(commands)
        writer.confirm()

    def resend_orphans(self, patience: float = 0.0) -> None:
        """Send the orphans again and wait until Redis answered them, retrying for up to
        ``patience`` seconds; what Redis could not be reached for is logged and kept for the
        next chance, what it refused is logged and dropped."""
        with self._orphans_lock:
            pending, self._orphans = self._orphans, {}
        if not pending:
            return
        runs = ", ".join(key.rpartition(":")[2] for key in pending)
        writer = RecordWriter(self.client, self.pool, runs, patience=patience)
        writer.send([command for commands in pending.values() for command in commands])
        try:
            writer.confirm()
        except StoreUnavailableError as exc:
            if isinstance(exc.__cause__, (*DOWN, *REFUSAL_ERRORS)):
                with self._orphans_lock:
                    self._orphans = {**pending, **self._orphans}
                logger.warning("%s: run records not written yet: %s", runs, exc)

    def _supersede(self, key: str) -> None:
        """Forget record ``key``'s orphans: the write being sent holds the whole record."""
        with self._orphans_lock:
            self._orphans.pop(key, None)

    def _send_on_next(self, commands: list[Command], key: str) -> None:
        """Queue ``commands`` on the idle connection the pool hands out next (LIFO)."""
        pool = self.client.connection_pool
        idle = getattr(pool, "_available_connections", None)
        if idle and getattr(pool, "pid", None) == os.getpid():
            # Single-threaded caller (see piggyback): nobody takes it meanwhile, no checkout.
            self._queue(idle[-1], commands, key)
            return
        connection = checkout(pool)
        try:
            self._queue(connection, commands, key)
        finally:
            pool.release(connection)

    def _queue(self, connection: Any, commands: list[Command], key: str) -> None:
        """Queue ``commands`` on an idle pool ``connection``: sent when Celery's next command
        is, their replies read (and errors logged) before that command's own."""
        queued: _Queued | None = connection.__dict__.get("_cte_queued")
        if queued is None:
            queued = self._watch(connection)
        if not queued.replies and dropped(connection):  # idle, nothing of ours to read
            connection.disconnect()
            self._supersede(key)
        if connection._sock is None:  # before ours are expected: connecting reads its own
            connection.connect()
        queued.commands.setdefault(key, []).extend(commands)
        queued.replies += [key] * len(commands)
        send(connection, pack(connection, commands), MSG_MORE)

    def _watch(self, connection: Any) -> _Queued:
        """Hook ``connection``: our replies are read before anyone's, a disconnect orphans
        the writes whose replies were not read."""
        queued = _Queued(self._orphan)
        read_response, can_read = connection.read_response, connection.can_read
        disconnect = connection.disconnect

        def read_ours_first(*args: Any, **kwargs: Any) -> Any:
            if queued.replies:
                queued.read_all(read_response)
            return read_response(*args, **kwargs)

        def can_read_after_ours(*args: Any, **kwargs: Any) -> Any:
            if queued.replies and can_read():  # ours were sent: read them, not Celery
                queued.read_all(read_response)
            return can_read(*args, **kwargs)

        def disconnect_and_orphan(*args: Any, **kwargs: Any) -> Any:
            if queued.replies:
                for key, commands in queued.commands.items():
                    self._orphan(key, commands)
            queued.commands.clear()
            queued.replies.clear()
            return disconnect(*args, **kwargs)

        connection._cte_queued = queued
        connection.read_response, connection.can_read = read_ours_first, can_read_after_ours
        connection.disconnect = disconnect_and_orphan
        return queued

    def _orphan(self, key: str, commands: list[Command]) -> None:
        """Keep record ``key``'s ``commands`` to send again (see the module docstring)."""
        RecordChannel.orphaned = True
        with self._orphans_lock:
            self._orphans[key] = [*self._orphans.get(key, []), *commands]

    def _pipeline(self, commands: Sequence[Command]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        try:
            pipe.execute()
        except REFUSAL_ERRORS:
            raise  # waited out (patiently)
        except redis.exceptions.ResponseError as exc:
            refused = refusal(exc)
            raise StoreUnavailableError(f"Redis refused a run record write: {refused}") from exc


class _Queued:
    """Writes queued on one of Celery's connections, by record key, and the record key of each
    reply not read yet, in order; ``orphan`` keeps a record's writes to send again."""

    __slots__ = ("commands", "orphan", "replies")

    def __init__(self, orphan: Callable[[str, list[Command]], None]) -> None:
        self.commands: dict[str, list[Command]] = {}
        self.replies: list[str] = []
        self.orphan = orphan

    def read_all(self, read_response: Callable[[], Any]) -> None:
        """Read our replies (with the connection's own reader). A record refused for a while
        (OOM, READONLY, NOPERM) is orphaned, to be sent again; another refusal is logged with
        the run id. A broken connection raises, and its disconnect orphans what is left."""
        passing: set[str] = set()
        while self.replies:
            key = self.replies[0]
            try:
                read_response()
            except REFUSAL_ERRORS as exc:
                if key not in passing:
                    logger.warning("%s: the run record is refused for now (%s); it is sent "
                                   "again", key.rpartition(":")[2], refusal(exc))  # fmt: skip
                passing.add(key)
            except redis.exceptions.ResponseError as exc:
                if key not in passing:  # else sent again with the rest of its writes
                    run_id = key.rpartition(":")[2]
                    logger.error("%s: the run record is not written: %s", run_id, refusal(exc))
            self.replies.pop(0)
        for key in passing:  # all its writes, in order: each holds the whole record
            self.orphan(key, self.commands.get(key, []))
        self.commands.clear()


def _nothing() -> None:
    pass
