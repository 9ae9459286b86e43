"""Redis writes that do not wait for a reply, for run records on a worker's hot path.

Measured on the 2-core reference machine, every time a Celery worker wakes Redis costs about
0.1 ms of CPU (the client, the server's event loop, context switches), and a plain Celery task
makes about eight round trips. Recording a run's Running and final states with blocking writes
cost a fifth of plain-Celery throughput; so these writes are sent after ``CLIENT REPLY SKIP``
(Redis >= 3.2), and, where it is safe, without waking Redis at all:

``RecordChannel.piggyback``
    In a single-threaded worker process (a prefork child, the solo CLI worker) the commands are
    queued (``MSG_MORE``, Linux) on the connection the result backend's pool hands out next:
    Celery's own next backend command, the read it makes before storing the task's result, is
    sent on that connection and carries them in the same packet. The kernel sends them on its
    own after 200 ms, and when the process dies, so a crashed run is still found Running.
``RecordChannel.own``
    Elsewhere (the threads pool, in-process test workers, the async loop thread) each thread
    writes on a connection of its own: a run's Running is held back (``MSG_MORE``) until its
    next write, its final state is sent at once.

Either way one run's writes travel on one connection, in order, and a run's final record
reaches Redis before Celery stores the task's result (Celery reads the result key first, on the
same connection or after ours was sent): when ``AsyncResult.get()`` returns, the record is
there. Servers that ignore ``CLIENT REPLY`` (some proxies) are detected once per process, and
then every write blocks.

Nothing is lost silently when Redis drops connections (restart, ``CLIENT KILL``, idle timeout):
a connection the server closed is found (one ``select``) and remade before a send; a send that
fails is made again once on a fresh connection; and writes queued for Celery's next command are
kept until a reply on that connection proves Redis read them. If the connection breaks first,
they become *orphans*, sent again (in order, superseded by any newer write of the same record)
before this channel's next write and when the delivery ends (:meth:`RecordChannel.resend_orphans`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import redis

from celery_taskengine._store.wire import (
    DOWN,
    MSG_MORE,
    PING_PACKED,
    SKIP,
    Command,
    dropped,
    pack,
    replies_can_be_skipped,
    send,
)
from celery_taskengine.errors import StoreUnavailableError

__all__ = ["RecordChannel"]

logger = logging.getLogger(__name__)


class RecordChannel:
    """Writes to ``client``'s server: on its pool's next connection, or a per-thread one."""

    #: Whether any channel of this process may have orphans (checked after every delivery).
    orphaned: ClassVar[bool] = False

    def __init__(self, client: redis.Redis, *, patience: float = 0.0) -> None:
        self.client = client
        #: Seconds a write is retried while Redis does not answer (as Celery retries its own).
        self.patience = patience
        self._local = threading.local()
        self._supported: bool | None = None
        #: Record key -> writes whose connection broke before Redis was seen to read them.
        self._orphans: dict[str, bytes] = {}
        self._orphans_lock = threading.Lock()

    @property
    def has_orphans(self) -> bool:
        return bool(self._orphans)

    def send(
        self, *commands: Command, key: str = "", piggyback: bool = False, hold: bool = False
    ) -> None:
        """Send ``commands`` (writes of record ``key``) in order, replies skipped.
        ``piggyback``: queue them for the pool's next command (see above); ``hold``: on an own
        connection, let the kernel wait for this thread's next send. While Redis does not
        answer they are retried for ``patience`` seconds, then :class:`StoreUnavailableError`."""
        if self._orphans:
            self._supersede(key)
            self.resend_orphans()
        try:
            self._send_now(commands, key, piggyback=piggyback, hold=hold)
        except DOWN:
            self._patiently(lambda: self._send_now(commands, key))

    def send_blocking(self, *commands: Command, key: str = "", piggyback: bool = False) -> None:
        """Send ``commands`` (writes of record ``key``) and wait until Redis has run them,
        after all this thread sent before on the same channel; retried as :meth:`send` is.
        Raises ``redis.ResponseError`` if one failed."""
        if self._orphans:
            self._supersede(key)
            self.resend_orphans()
        try:
            self._send_and_wait(commands, piggyback=piggyback)
        except DOWN:
            self._patiently(lambda: self._send_and_wait(commands))

    def resend_orphans(self, patience: float = 0.0) -> None:
        """Send the orphans again and wait until Redis has read them, retrying for up to
        ``patience`` seconds; what still fails is logged and kept for the next chance."""
        with self._orphans_lock:
            pending, self._orphans = self._orphans, {}
        if not pending:
            return

        def resend() -> None:
            connection = self._own_connection()
            send(connection, b"".join(pending.values()) + PING_PACKED, 0)
            connection.read_response()  # PING: everything before it was read

        try:
            self._patiently(resend, patience)
        except StoreUnavailableError as exc:
            with self._orphans_lock:
                self._orphans = {**pending, **self._orphans}
            logger.warning("%d run records not written yet: %s", len(pending), exc)

    def _supersede(self, key: str) -> None:
        """Forget record ``key``'s orphans: the write being sent holds the whole record."""
        with self._orphans_lock:
            self._orphans.pop(key, None)

    def _send_now(
        self, commands: Sequence[Command], key: str, *, piggyback: bool = False, hold: bool = False
    ) -> None:
        if not self._skips_replies():
            self._pipeline(commands)
            return
        data = pack([part for command in commands for part in (SKIP, command)])
        if piggyback and MSG_MORE:
            self._send_on_next(data, key)
            return
        send(self._own_connection(), data, MSG_MORE if hold else 0)
        if self._orphans:  # this record's writes queued on a connection that broke meanwhile
            self._supersede(key)

    def _send_and_wait(self, commands: Sequence[Command], *, piggyback: bool = False) -> None:
        if piggyback or not self._skips_replies():
            self._pipeline(commands)  # the pool's next connection: the one queued on
            return
        connection = self._own_connection()
        send(connection, pack(commands), 0)
        errors = []
        for _ in commands:  # read every reply, so the connection stays in step
            try:
                connection.read_response()
            except redis.exceptions.ResponseError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def _patiently(self, action: Callable[[], None], patience: float | None = None) -> None:
        """Run ``action`` until Redis takes it, on fresh connections, backing off; after
        ``patience`` seconds (the channel's by default) :class:`StoreUnavailableError`."""
        deadline = time.monotonic() + (self.patience if patience is None else patience)
        delay = 0.05
        while True:
            self._drop_own_connection()
            try:
                action()
                return
            except DOWN as exc:
                if time.monotonic() + delay > deadline:
                    raise StoreUnavailableError(
                        f"cannot write run records to Redis: {exc}"
                    ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _send_on_next(self, data: bytes, key: str) -> None:
        """Queue ``data`` on the idle connection the pool hands out next (LIFO)."""
        pool = self.client.connection_pool
        idle = getattr(pool, "_available_connections", None)
        if idle and getattr(pool, "pid", None) == os.getpid():
            # Single-threaded caller (see piggyback): nobody takes it meanwhile, no checkout.
            self._queue(idle[-1], data, key)
            return
        connection = pool.get_connection()
        try:
            self._queue(connection, data, key)
        finally:
            pool.release(connection)

    def _queue(self, connection: Any, data: bytes, key: str) -> None:
        """Queue ``data`` on an idle pool ``connection``, kept until a reply on it proves Redis
        read it: Celery's command, not ours, is the one that reads from it."""
        pending: dict[str, bytes] | None = connection.__dict__.get("_cte_pending")
        if pending is None:
            pending = self._watch(connection)
        if dropped(connection):
            connection.disconnect()  # orphans what it held; reconnected by the send below
            self._supersede(key)
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
        if self._supported is None:
            self._own_connection()  # probes the server once
        return bool(self._supported)

    def _own_connection(self) -> Any:
        """This thread's connection: made on first use and after a fork, remade if dropped;
        ``None`` when writes must go through the pool, blocking."""
        local = self._local
        connection = getattr(local, "connection", None)
        if connection is not None and getattr(local, "pid", None) == os.getpid():
            if dropped(connection):  # a send on it would be lost without an error
                connection.disconnect()
                connection.connect()
            return connection
        pool = self.client.connection_pool
        try:
            connection = pool.connection_class(**pool.connection_kwargs)
        except TypeError:  # a pool whose connections need more (Sentinel): stay with the pool
            logger.warning("run records are written blocking: cannot open a connection of our own")
            self._supported = False
            return None
        connection.connect()
        if self._supported is None:
            self._supported = replies_can_be_skipped(connection)
        local.connection, local.pid = connection, os.getpid()
        return connection

    def _drop_own_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None and getattr(self._local, "pid", None) == os.getpid():
            connection.disconnect()

    def _pipeline(self, commands: Sequence[Command]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        pipe.execute()
