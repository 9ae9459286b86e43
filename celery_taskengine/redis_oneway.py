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
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis

from celery_taskengine.errors import StoreUnavailableError

__all__ = ["RecordChannel"]

logger = logging.getLogger(__name__)

Command = Sequence[Any]
#: After this many idle seconds an own connection is checked before use: a server that closed
#: it (its ``timeout`` setting) would otherwise swallow the next send. Checking is a syscall.
IDLE_CHECK_SECONDS = 5.0
_SKIP = ("CLIENT", "REPLY", "SKIP")
_PROBE = b"celery-taskengine-probe"
_MSG_MORE: int = getattr(socket, "MSG_MORE", 0)
_SKIP_PACKED = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$4\r\nSKIP\r\n"


class RecordChannel:
    """Writes to ``client``'s server: on its pool's next connection, or a per-thread one."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._local = threading.local()
        self._supported: bool | None = None

    def send(self, *commands: Command, piggyback: bool = False, hold: bool = False) -> None:
        """Send ``commands`` in order, replies skipped; :class:`StoreUnavailableError` if
        Redis is down. ``piggyback``: queue them for the pool's next command (see above);
        ``hold``: on an own connection, let the kernel wait for this thread's next send."""
        with self._available():
            if not self._skips_replies():
                self._pipeline(commands)
                return
            data = _pack([part for command in commands for part in (_SKIP, command)])
            if piggyback and _MSG_MORE:
                self._send_on_next(data)
            else:
                _send(self._own_connection(), data, _MSG_MORE if hold else 0)

    def send_blocking(self, *commands: Command, piggyback: bool = False) -> None:
        """Send ``commands`` and wait until Redis has run them, after all this thread sent
        before on the same channel. Raises ``redis.ResponseError`` if one failed."""
        with self._available():
            if piggyback or not self._skips_replies():
                self._pipeline(commands)  # the pool's next connection: the one queued on
                return
            connection = self._own_connection()
            _send(connection, _pack(commands), 0)
            errors = []
            for _ in commands:  # read every reply, so the connection stays in step
                try:
                    connection.read_response()
                except redis.exceptions.ResponseError as exc:
                    errors.append(exc)
            if errors:
                raise errors[0]

    def _send_on_next(self, data: bytes) -> None:
        """Queue ``data`` on the idle connection the pool hands out next (LIFO)."""
        pool = self.client.connection_pool
        idle = getattr(pool, "_available_connections", None)
        if idle and getattr(pool, "pid", None) == os.getpid():
            # Single-threaded caller (see piggyback): nobody takes it meanwhile, no checkout.
            _send(idle[-1], data, _MSG_MORE)
            return
        connection = pool.get_connection()
        try:
            _send(connection, data, _MSG_MORE)
        finally:
            pool.release(connection)

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
            now = time.monotonic()
            if now - local.used > IDLE_CHECK_SECONDS and _closed_by_server(connection):
                connection.disconnect()
                connection.connect()
            local.used = now
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
            self._supported = _replies_can_be_skipped(connection)
        local.connection, local.pid, local.used = connection, os.getpid(), time.monotonic()
        return connection

    def _pipeline(self, commands: Sequence[Command]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        pipe.execute()

    @contextmanager
    def _available(self) -> Iterator[None]:
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            self._local.connection = None
            raise StoreUnavailableError(f"cannot write run records to Redis: {exc}") from exc


def _send(connection: Any, data: bytes, flags: int) -> None:
    sock = getattr(connection, "_sock", None)  # redis-py's socket, once connected
    if flags and isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket):
        try:
            sock.sendall(data, flags)
        except OSError:
            connection.disconnect()
            raise
    else:  # TLS sockets refuse send flags; this sends at once
        connection.send_packed_command([data], check_health=False)


def _pack(commands: Sequence[Command]) -> bytes:
    """RESP for ``commands`` (redis-py's packer costs several times more, in pure Python)."""
    parts: list[bytes] = []
    for command in commands:
        if command is _SKIP:
            parts.append(_SKIP_PACKED)
            continue
        parts.append(b"*%d\r\n" % len(command))
        for arg in command:
            if isinstance(arg, str):
                data = arg.encode()
            elif isinstance(arg, bytes):
                data = arg
            else:
                data = (
                    str(arg).encode() if not isinstance(arg, bytearray | memoryview) else bytes(arg)
                )
            parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(parts)


def _closed_by_server(connection: Any) -> bool:
    """Whether the server hung up (idle timeout, restart): a send would then be lost."""
    try:
        return bool(connection.can_read())  # a live connection we never read has nothing to read
    except (redis.exceptions.ConnectionError, OSError):
        return True


def _replies_can_be_skipped(connection: Any) -> bool:
    """Whether the server honours ``CLIENT REPLY SKIP``: only the ECHO should answer."""
    try:
        connection.send_packed_command(
            [_pack([_SKIP, ("PING",), ("ECHO", _PROBE)])], check_health=False
        )
        reply = connection.read_response()
    except redis.exceptions.ResponseError:
        reply = None
    supported = reply in (_PROBE, _PROBE.decode())
    if not supported:
        connection.disconnect()  # its replies are out of step now
        logger.warning("Redis ignores CLIENT REPLY SKIP; run records are written blocking")
    return supported
