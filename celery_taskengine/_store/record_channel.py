"""Worker run records written without waiting: riding on Celery's connection, or on one of ours.

Every time a Celery worker wakes Redis costs CPU (the client, the server's event loop, context
switches), and a plain Celery task makes about eight round trips; recording a run's Running and
final states with blocking writes cost a fifth of plain-Celery throughput. So:

``RecordChannel.send(..., piggyback=True)``
    In a single-threaded worker process (a prefork child, the solo CLI worker) the commands are
    queued (``MSG_MORE``, Linux) after ``CLIENT REPLY SKIP`` on the connection the result
    backend's pool hands out next: Celery's own next backend command, the read it makes before
    storing the task's result, is sent on that connection and carries them in the same packet.
    Reply order forces the skip (Celery reads only its own reply); the writes count as
    unconfirmed until that reply arrives, which proves Redis read them.
:class:`~._store.record_writer.RecordWriter` (``RecordChannel.writer``)
    Elsewhere (the threads and gevent pools, ``async def`` tasks on the loop thread, in-process
    workers) a delivery writes on a connection of the engine pool: sent without waiting, every
    reply read before Celery stores the task's result, so every error is seen.

Either way one run's writes travel on one connection, in order, and a run's final record
reaches Redis before Celery stores the task's result: when ``AsyncResult.get()`` returns, the
record is there. Servers that ignore ``CLIENT REPLY`` (some proxies) are detected once per
process, and then piggybacked writes block.

Writes queued for Celery's next command are kept until a reply on that connection proves Redis
read them. If the connection breaks first, they become *orphans*, sent again (in order,
superseded by any newer write of the same record) before this channel's next write and when the
delivery ends (:meth:`RecordChannel.resend_orphans`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import redis

from celery_taskengine._store.connections import EnginePool
from celery_taskengine._store.record_writer import RecordWriter, patiently
from celery_taskengine._store.wire import (
    DOWN,
    MSG_MORE,
    PING_PACKED,
    SKIP,
    Command,
    checkout,
    dropped,
    pack,
    read_reply,
    refusal,
    replies_can_be_skipped,
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
        self._supported: bool | None = None
        #: Record key -> writes whose connection broke before Redis was seen to read them.
        self._orphans: dict[str, bytes] = {}
        self._orphans_lock = threading.Lock()

    @property
    def has_orphans(self) -> bool:
        return bool(self._orphans)

    def writer(self, run_id: str) -> RecordWriter:
        """A writer for one delivery of run ``run_id`` (see the module docstring)."""
        return RecordWriter(self.client, self.pool, run_id, patience=self.patience)

    def send(self, *commands: Command, key: str = "", piggyback: bool = False) -> None:
        """Send ``commands`` (writes of record ``key``) in order. ``piggyback``: queue them,
        replies skipped, for the pool's next command (see above); otherwise they are written
        on an engine connection and confirmed. While Redis does not answer they are retried
        for ``patience`` seconds, then :class:`StoreUnavailableError`."""
        if self._orphans:
            self._supersede(key)
            self.resend_orphans()
        if not piggyback or not MSG_MORE or not self._skips_replies():
            self.send_blocking(*commands, key=key, piggyback=piggyback)
            return
        try:
            self._send_on_next(_skipping(commands), key)
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
        """Send the orphans again and wait until Redis has read them, retrying for up to
        ``patience`` seconds; what still fails is logged and kept for the next chance."""
        with self._orphans_lock:
            pending, self._orphans = self._orphans, {}
        if not pending:
            return
        # An engine connection, or (none to spare) one checked out of the client's pool.
        pool: EnginePool | None = self.pool
        connection = self.pool.take()
        if connection is None:
            connection, pool = checkout(self.client.connection_pool), None

        def resend() -> None:
            send(connection, b"".join(pending.values()) + PING_PACKED, 0)
            read_reply(connection)  # PING: everything before it was read

        try:
            patiently(resend, patience, before_each=connection.disconnect)
        except StoreUnavailableError as exc:
            with self._orphans_lock:
                self._orphans = {**pending, **self._orphans}
            logger.warning("%d run records not written yet: %s", len(pending), exc)
        finally:
            if pool is not None:
                pool.give_back(connection)
            else:
                self.client.connection_pool.release(connection)

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
        """Queue ``commands`` on an idle pool ``connection``, kept until a reply on it proves Redis
        read it: Celery's command, not ours, is the one that reads from it."""
        pending: dict[str, bytes] | None = connection.__dict__.get("_cte_pending")
        if pending is None:
            pending = self._watch(connection)
        if dropped(connection):
            connection.disconnect()  # orphans what it held; reconnected by the send below
            self._supersede(key)
        data = pack(connection, commands)
        pending[key] = pending.get(key, b"") + data
        send(connection, data, MSG_MORE)

    def _watch(self, connection: Any) -> dict[str, bytes]:
        """Hook ``connection``: a reply clears what is pending on it, a disconnect orphans it."""
        pending: dict[str, bytes] = {}
        read_response, disconnect = connection.read_response, connection.disconnect

        def read_and_confirm(*args: Any, **kwargs: Any) -> Any:
            response = read_response(*args, **kwargs)
            if pending:  # an idle connection's first reply: what was queued before was read
                pending.clear()
            return response

        def disconnect_and_orphan(*args: Any, **kwargs: Any) -> Any:
            if pending:
                RecordChannel.orphaned = True
                with self._orphans_lock:
                    for key, data in pending.items():
                        self._orphans[key] = self._orphans.get(key, b"") + data
                pending.clear()
            return disconnect(*args, **kwargs)

        connection._cte_pending = pending
        connection.read_response = read_and_confirm
        connection.disconnect = disconnect_and_orphan
        return pending

    def _skips_replies(self) -> bool:
        """Whether the server honours ``CLIENT REPLY SKIP`` (probed once, on an engine
        connection; without one to spare, piggybacked writes block until the next probe)."""
        if self._supported is None:
            connection = self.pool.take()
            if connection is None:
                return False
            try:
                connection.connect()
                self._supported = replies_can_be_skipped(connection)
            except DOWN:
                connection.disconnect()
                return False
            finally:
                self.pool.give_back(connection)
        return self._supported

    def _pipeline(self, commands: Sequence[Command]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        try:
            pipe.execute()
        except redis.exceptions.ResponseError as exc:
            refused = refusal(exc)
            raise StoreUnavailableError(f"Redis refused a run record write: {refused}") from exc


def _skipping(commands: Sequence[Command]) -> list[Command]:
    return [part for command in commands for part in (SKIP, command)]


def _nothing() -> None:
    pass
