"""Raw Redis protocol on redis-py's connections: packing commands and sending them as they are.

The engine's run records and early cache reads bypass redis-py's command layer on their hot
paths (its packer and pool cost several times more, in pure Python): they pack RESP here, send
it on a connection's socket, and read answers with the connection's own parser.
"""

from __future__ import annotations

import logging
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
    "SKIP",
    "Command",
    "dropped",
    "pack",
    "replies_can_be_skipped",
    "send",
]

logger = logging.getLogger(__name__)

Command = Sequence[Any]
#: Put before a command so Redis sends no answer to it (Redis >= 3.2).
SKIP = ("CLIENT", "REPLY", "SKIP")
#: Let the kernel hold what is sent until more follows (or 200 ms pass), Linux only.
MSG_MORE: int = getattr(socket, "MSG_MORE", 0)
#: What a send or read raises when Redis is down or hung up.
DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
PING_PACKED = b"*1\r\n$4\r\nPING\r\n"
_SKIP_PACKED = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$4\r\nSKIP\r\n"
_PROBE = b"celery-taskengine-probe"
_poll = getattr(select, "poll", None)


def pack(commands: Sequence[Command]) -> bytes:
    """RESP for ``commands``."""
    parts: list[bytes] = []
    for command in commands:
        if command is SKIP:
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
        connection.send_packed_command([data], check_health=False)


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


def replies_can_be_skipped(connection: Any) -> bool:
    """Whether the server honours ``CLIENT REPLY SKIP``: only the ECHO should answer."""
    try:
        connection.send_packed_command(
            [pack([SKIP, ("PING",), ("ECHO", _PROBE)])], check_health=False
        )
        reply = connection.read_response()
    except redis.exceptions.ResponseError:
        reply = None
    supported = reply in (_PROBE, _PROBE.decode())
    if not supported:
        connection.disconnect()  # its replies are out of step now
        logger.warning("Redis ignores CLIENT REPLY SKIP; run records are written blocking")
    return supported
