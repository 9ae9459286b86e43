"""Redis commands on redis-py's connections, sent without waiting and answered later.

The engine's run records and early cache reads bypass redis-py's client layer on their hot
paths (its pool checkout and per-command bookkeeping cost more than the rest of a cache hit):
they pack commands with the connection's own packer, send them on its socket (with
``MSG_MORE`` where the kernel may hold them for more) and read the replies later with the
connection's own parser, so every error is still seen.
"""

from __future__ import annotations

import inspect
import select
import socket
import ssl
from collections.abc import Sequence
from typing import Any

import redis

__all__ = [
    "DOWN",
    "MSG_MORE",
    "PING_PACKED",
    "Command",
    "checkout",
    "dropped",
    "pack",
    "read_reply",
    "redis_pack",
    "refusal",
    "send",
]

Command = Sequence[Any]
#: Let the kernel hold what is sent until more follows (or 200 ms pass), Linux only.
MSG_MORE: int = getattr(socket, "MSG_MORE", 0)
#: What a send or read raises when Redis is down or hung up.
DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
PING_PACKED = b"*1\r\n$4\r\nPING\r\n"
_poll = getattr(select, "poll", None)


def pack(connection: Any, commands: Sequence[Command]) -> bytes:
    """RESP for ``commands``, encoded as ``connection``'s own packer encodes them (its
    ``encoding`` and ``encoding_errors``).

    Written out here for the arguments the engine sends (``str``, ``bytes``, ``int``): redis-py's
    packer goes through several Python calls per argument and copies its buffer again for each
    one, which makes a batch of run records cost many times its own encoding
    (``bench/packing.py`` measures both). Any other argument is left to redis-py's packer.
    """
    encoder = connection.encoder
    encoding, errors = encoder.encoding, encoder.encoding_errors
    out: list[bytes] = []
    for command in commands:
        first = command[0]
        if not isinstance(first, str) or " " in first:  # "SCRIPT LOAD": redis-py splits it
            return redis_pack(connection, commands)
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            if isinstance(arg, str):
                data = arg.encode(encoding, errors)
            elif isinstance(arg, bytes):
                data = arg
            elif type(arg) is int:
                data = b"%d" % arg
            else:
                return redis_pack(connection, commands)
            out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


def redis_pack(connection: Any, commands: Sequence[Command]) -> bytes:
    """RESP for ``commands`` from ``connection``'s own packer."""
    return b"".join(connection.pack_commands(commands))


def checkout(pool: Any) -> Any:
    """A connection from redis-py ``pool``: 5.x requires a command name, which 6.x and later
    deprecate (and ignore), so it is given only to the versions that need it."""
    pool_class = type(pool)
    needs = _needs_command_name.get(pool_class)
    if needs is None:
        needs = _needs_command_name[pool_class] = _asks_command_name(pool_class)
    return pool.get_connection("PING") if needs else pool.get_connection()


_needs_command_name: dict[type, bool] = {}


def _asks_command_name(pool_class: type) -> bool:
    try:
        parameters = inspect.signature(pool_class.get_connection).parameters  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return True
    command_name = parameters.get("command_name")
    return command_name is not None and command_name.default is inspect.Parameter.empty


def send(connection: Any, data: bytes, flags: int = 0) -> None:
    """Send packed ``data`` on a redis-py ``connection`` (connecting it first if need be)."""
    sock = getattr(connection, "_sock", None)  # redis-py's socket, once connected
    if isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket):
        try:
            sock.sendall(data, flags)
        except OSError:
            connection.disconnect()
            raise
    else:  # not connected yet, or TLS (which refuses send flags): this sends at once
        if sock is None:
            # connect() is what a Sentinel-managed connection overrides to ask the sentinels
            # for the master; send_packed_command alone connects to its default host.
            connection.connect()
        connection.send_packed_command([data], check_health=False)


def read_reply(connection: Any, timeout: float | None = None) -> Any:
    """The next reply on ``connection`` (an error reply raised as redis-py raises it), waiting
    at most ``timeout`` seconds for it to start arriving (``None``: the socket timeout).
    redis-py 5.0 has no ``timeout`` on ``read_response``, so the wait is a ``can_read``."""
    if timeout is not None and not connection.can_read(timeout=timeout):
        raise redis.exceptions.TimeoutError(f"no reply from Redis within {timeout:g} s")
    return connection.read_response()


def refusal(exc: BaseException) -> str:
    """An error reply as a log line shows it: redis-py strips the code (``OOM``, ``NOPERM``,
    ``READONLY``) from the message and keeps it in the class name."""
    return f"{type(exc).__name__}: {exc}"


def dropped(connection: Any) -> bool:
    """Whether the server hung up (restart, ``CLIENT KILL``, idle timeout): an idle connection
    has nothing to read unless it was closed. One ``poll``: about a microsecond (``select``
    would fail on descriptors above 1023)."""
    sock = getattr(connection, "_sock", None)
    if sock is None:
        return False  # not connected: the next use connects
    try:
        if _poll is None:
            return bool(select.select([sock], [], [], 0)[0])
        poller = _poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True
