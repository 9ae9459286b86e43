"""One delivery's run-record writes on a connection of its own: sent at once, confirmed later.

A worker run writes its record at Running and at its final state. Waiting for Redis at each
would cost a round trip per state; skipping the replies (``CLIENT REPLY SKIP``) hides every
error (OOM, NOPERM, READONLY) and every write a hung or restarted server never ran. So a
:class:`RecordWriter` sends each write as it comes (Running held back by the kernel,
``MSG_MORE``, to travel with the next one) and reads all the replies in :meth:`confirm`, which
the delivery calls before Celery stores the task's result. A write counts as made only when its
reply arrived: until then it is kept, and sent again on a fresh connection while Redis is down
or hung, or refuses it for a while (OOM, READONLY, NOPERM: see retrying), for as long as
Celery's backend would retry its own write (``patience``). What still fails is logged with the
run id and raised as :class:`StoreUnavailableError`, so the delivery never reports success over
a record that does not exist.

The connection comes from the store's engine pool (:mod:`~._store.connections`) and goes back at
:meth:`confirm`; when the pool has none to spare, each write is made blocking through the
client instead.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from celery_taskengine._store.connections import EnginePool
from celery_taskengine._store.retrying import REFUSAL_ERRORS
from celery_taskengine._store.wire import (
    DOWN,
    MSG_MORE,
    Command,
    dropped,
    pack,
    read_reply,
    refusal,
    send,
)
from celery_taskengine.errors import StoreUnavailableError

__all__ = ["RecordWriter", "patiently"]

logger = logging.getLogger(__name__)


def patiently(
    action: Callable[[], None], patience: float, *, before_each: Callable[[], None]
) -> None:
    """Run ``action`` until Redis takes it, backing off, ``before_each`` try (which drops the
    connection a failed try left); a refusal that passes (OOM, READONLY, NOPERM) is tried again
    as an outage is. After ``patience`` seconds, and at least one try on a fresh connection,
    :class:`StoreUnavailableError`."""
    deadline = time.monotonic() + patience
    delay = 0.05
    for tries in itertools.count(1):
        before_each()
        try:
            action()
            return
        except REFUSAL_ERRORS as exc:
            if tries > 1 and time.monotonic() + delay > deadline:
                refused = refusal(exc)
                raise StoreUnavailableError(f"Redis refused a run record write: {refused}") from exc
        except DOWN as exc:
            if tries > 1 and time.monotonic() + delay > deadline:
                raise StoreUnavailableError(f"cannot write run records to Redis: {exc}") from exc
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


class RecordWriter:
    """The writes of run ``run_id``'s record (and what travels with them), in order."""

    def __init__(
        self, client: redis.Redis, pool: EnginePool, run_id: str, *, patience: float
    ) -> None:
        self._client, self._pool, self.run_id, self.patience = client, pool, run_id, patience
        self._connection: Any = None
        #: Commands sent or to send whose replies are not read yet, in order.
        self._pending: list[Command] = []
        #: How many of them are on the current connection (the rest go with the next send).
        self._on_connection = 0
        #: The first error reply read so far, raised by confirm().
        self._refused: redis.exceptions.ResponseError | None = None

    def send(self, commands: Sequence[Command], *, hold: bool = False) -> None:
        """Send ``commands`` now without waiting (``hold``: let the kernel keep them for the
        next send, at most 200 ms); a failed send is left for :meth:`confirm` to make again."""
        self._pending.extend(commands)
        if self._connection is None:
            self._connection = self._take()
            if self._connection is None:  # the engine pool is exhausted: write blocking
                with contextlib.suppress(*DOWN, *REFUSAL_ERRORS):  # kept: confirm() tries again
                    self._write_blocking()
                return
        try:
            self._send_unsent(MSG_MORE if hold else 0)
        except DOWN:
            self._drop()

    def confirm(self) -> None:
        """Read the reply of every write sent, making the unanswered ones again on fresh
        connections while Redis is down (``patience``); the connection goes back to the pool.

        Raises :class:`StoreUnavailableError` (logged with the run id) if Redis never took them
        or refused one (OOM, NOPERM, READONLY, a script error).
        """
        try:
            if self._pending:
                patiently(self._read_all, self.patience, before_each=self._reconnect_if_needed)
            if self._refused is not None:
                refused = refusal(self._refused)
                raise StoreUnavailableError(f"Redis refused a run record write: {refused}")
        except StoreUnavailableError as exc:
            logger.error("%s: the run record is not written: %s", self.run_id, exc)
            self._pending.clear()
            raise
        finally:
            self._release()

    def _read_all(self) -> None:
        if self._connection is None:
            self._write_blocking()
            return
        self._send_unsent(0)
        again: list[Command] = []  # from the first passing refusal on: made again, in order
        passing: Exception | None = None
        try:
            while self._on_connection:
                try:
                    read_reply(self._connection)
                except REFUSAL_ERRORS as exc:
                    passing = passing or exc
                except redis.exceptions.ResponseError as exc:
                    if passing is None:  # after a passing refusal, all is made again anyway
                        self._refused = self._refused or exc
                command = self._pending.pop(0)
                self._on_connection -= 1
                if passing is not None:
                    again.append(command)
        finally:
            self._pending[:0] = again
        if passing is not None:
            if isinstance(passing, redis.exceptions.ReadOnlyError):
                self._drop()  # a demoted server: the next try connects anew
            raise passing

    def _take(self) -> Any:
        """An engine connection, checked: one the server closed while idle is remade."""
        connection = self._pool.take()
        if connection is not None and connection._sock is not None and dropped(connection):
            connection.disconnect()  # a send on it would be lost without an error
        return connection

    def _send_unsent(self, flags: int) -> None:
        unsent = self._pending[self._on_connection :]
        if unsent:
            send(self._connection, pack(self._connection, unsent), flags)
            self._on_connection = len(self._pending)

    def _write_blocking(self) -> None:
        """The pending writes through the client's pool, each reply read (the engine pool
        had no connection to spare)."""
        pipe = self._client.pipeline(transaction=False)
        for command in self._pending:
            pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        try:
            replies = pipe.execute(raise_on_error=False)
        finally:
            pipe.reset()
        pending, self._pending = self._pending, []
        passing = next((r for r in replies if isinstance(r, REFUSAL_ERRORS)), None)
        if passing is not None:  # made again from there on, in order
            self._pending = pending[replies.index(passing) :]
            raise passing
        for reply in replies:
            if isinstance(reply, redis.exceptions.ResponseError):
                self._refused = self._refused or reply

    def _reconnect_if_needed(self) -> None:
        """Before a try: a connection that failed is replaced, and nothing is on it yet."""
        if self._connection is not None and self._connection._sock is None:
            self._on_connection = 0

    def _drop(self) -> None:
        """Close the connection after a failure: what was on it is sent again."""
        if self._connection is not None:
            self._connection.disconnect()
        self._on_connection = 0

    def _release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._pool.give_back(connection, broken=bool(self._on_connection))
        self._on_connection = 0
