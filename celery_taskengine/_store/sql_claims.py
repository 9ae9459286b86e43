"""Delivery claims on a SQL database: the rows behind :mod:`~celery_taskengine._store.claims`.

The semantics are those of the Redis store's claims (read that module first): one row per
message, keyed ``<run id>:<Celery retries>``, holding a delivery's token and when its lease
lapses, or ``done:<token>`` once that delivery wrote its outcome. A claim is taken by a
conditional ``UPDATE`` (the row is ours already, or lapsed) or, when there is no row, by an
``INSERT`` that ignores a duplicate key: the primary key lets one delivery in.

Fenced writes (run records, the done marker, cache commits) take or check the claim in the
transaction that writes, so a delivery that lost its claim writes nothing; the row lock the
``UPDATE`` takes keeps the claim the writer's until the commit. Renewals are autocommitted
single statements (a short transaction on SQLite), so a paused process holds no claim's row
lock between two round trips.

Celery's stored result is fenced by a SQL claim when Celery's database backend keeps it in the
same database: it commits with the final record and the done marker (see sql_worker_records).
Elsewhere (another database, Redis) it is not: a delivery that lost its claim ends with
``Ignore`` before Celery stores anything, and the holder settles its claim with its final
record before Celery stores the holder's result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from sqlalchemy import Connection, and_, bindparam, or_, select, update
from sqlalchemy import exc as sa_exc

from celery_taskengine._store import sql_schema as schema
from celery_taskengine._store.claims import (
    LAPSE_MARGIN_SECONDS,
    Claim,
    announce_wait,
    is_done,
)
from celery_taskengine._store.sql_support import insert_if_new, insert_statement, reconnecting
from celery_taskengine.errors import StoreUnavailableError

__all__ = ["SqlClaim", "SqlClaims"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_c = schema.claims.c
#: Takes the claim row when it is the writer's already or has lapsed (``holder`` may be the
#: token, or the done marker when settling).
_TAKE = (
    update(schema.claims)
    .where(
        _c.namespace == bindparam("b_namespace"),
        _c.key == bindparam("b_key"),
        or_(
            _c.holder == bindparam("b_token"),
            and_(_c.expires_at.is_not(None), _c.expires_at <= bindparam("b_now")),
        ),
    )
    .values(holder=bindparam("b_holder"), expires_at=bindparam("b_until"))
)
_LOOK = select(_c.holder, _c.expires_at).where(
    _c.namespace == bindparam("b_namespace"), _c.key == bindparam("b_key")
)
# Replaces a holder whose claim cannot lapse (no expiry: written by something else than us).
_REPLACE = (
    update(schema.claims)
    .where(
        _c.namespace == bindparam("b_namespace"),
        _c.key == bindparam("b_key"),
        _c.holder == bindparam("b_old"),
    )
    .values(holder=bindparam("b_holder"), expires_at=bindparam("b_until"))
)
#: A claim's row inserted unless its key is there (see sql_support.insert_if_new).
_INSERT_NEW: dict[str, Any] = {
    name: insert_statement(schema.claims, name, _c.key)
    for name in ("postgresql", "sqlite", "mysql", "mariadb")
}


class SqlClaim(Claim):
    """A claim kept in a SQL store's ``cte_claims`` table."""

    def fences_results_of(self, backend: Any) -> bool:
        """Never by a script on a key-value backend: a SQL claim fences Celery's result only
        in the store's own transaction (see the module docstring)."""
        return False


class SqlClaims:
    """The claim operations of :class:`~celery_taskengine._store.sql_store.SqlStore`."""

    claims: bool = True
    #: The claim a view made by :meth:`fenced_by` writes cache records under.
    _fence: Claim | None = None
    namespace: str
    run_expires: float | None
    url: str
    _clock: Callable[[], float]
    _connection: Callable[..., AbstractContextManager[Connection]]
    _autocommits: bool

    def new_claim(self, run_id: str, attempt: int, ttl: float) -> Claim:
        """A new claim (not taken yet) on the message of ``run_id``'s attempt ``attempt``
        (Celery's ``retries``), living ``ttl`` seconds unless renewed."""
        return SqlClaim(self, f"{run_id}:{attempt}", run_id, ttl)

    def take_claim(self, claim: Claim, *, poll: float, patience: float = 0.0) -> bool:
        """Take ``claim``, waiting while another live delivery holds it: at most until the
        holder's claim would lapse unless renewed. ``True``: ours (a crashed holder's run is
        ours to take over); ``False``: another delivery settled the message. An unreachable
        database raises :class:`StoreUnavailableError` (``patience`` is Redis's)."""
        announced, stuck_since = False, None
        while True:
            sent_at = time.monotonic()
            if self._take(claim):
                claim.proven(sent_at)
                return True
            holder, expires_at = self._look(claim)
            if holder is None:
                continue  # lapsed and deleted in between: take it now
            if is_done(holder):
                return False
            if not announced:
                announced = True
                announce_wait(claim, holder)
            if expires_at is None:  # cannot lapse: replaced once a lifetime has passed
                stuck_since = stuck_since or time.monotonic()
                stuck = time.monotonic() - stuck_since > claim.ttl + LAPSE_MARGIN_SECONDS
                if stuck and self._replace(claim, holder):
                    claim.proven(sent_at)
                    return True
                left = poll
            else:
                left = expires_at - self._clock() + LAPSE_MARGIN_SECONDS
            time.sleep(max(0.0, min(poll, left)))

    @reconnecting
    def renew_claim(self, claim: Claim) -> bool:
        """Extend ``claim`` (or take it again if it lapsed and is free); ``False`` if another
        delivery holds it. Autocommitted statements: called from the renewer's thread."""
        with self._connection(write=not self._autocommits) as conn:
            if self._hold(conn, claim):
                return True
            holder = conn.execute(_LOOK, self._claim_params(claim)).scalar_one_or_none()
        return holder == claim.done_value

    @reconnecting
    def save_run_fenced(
        self,
        run: Any,
        claim: Claim,
        *,
        settle: bool,
        values: dict[str, Any] | None = None,
        also: Callable[[Connection], None] | None = None,
    ) -> bool:
        """Write ``run``'s record (``values``: as encoded earlier) and, with ``settle``, the
        done marker in one transaction, with ``also(conn)`` (Celery's task row), only while
        ``claim`` is the delivery's; ``False`` (and the claim lost) if not."""
        if claim.lost:
            return False
        save: Any = self
        if values is None:
            values = save._run_values(run)
        sent_at = time.monotonic()
        with self._connection(write=True) as conn:
            held = self._hold(conn, claim, settle=settle)
            if held:
                save._upsert(conn, schema.runs, {"run_id": run.id}, values)
                if also is not None:
                    also(conn)
        return _answered(claim, held, sent_at)

    def fenced_by(self, claim: Claim | None) -> Any:
        """This store as an attempt holding ``claim`` uses it: cache commits are written only
        while the claim is the attempt's (the same store when there is no claim)."""
        if claim is None:
            return self
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._fence = claim
        return view

    def call(
        self, operation: Callable[[], T], what: str, run_id: str = "", patience: Any = None
    ) -> T:
        """``operation()``, a database's refusal to connect as :class:`StoreUnavailableError`
        (for the bridge's calls around claims, as on the Redis store)."""
        try:
            return operation()
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            said = f"{run_id}: {what}" if run_id else what
            raise StoreUnavailableError(f"{said}: {self.url} is unavailable: {exc}") from exc

    def claim_holder(self, run_id: str, attempt: int) -> str | None:
        """Who holds the claim on ``run_id``'s attempt ``attempt`` (a token, ``done:...``)."""
        claim = self.new_claim(run_id, attempt, 1.0)
        holder, expires_at = self._look(claim)
        if holder is None or (expires_at is not None and expires_at <= self._clock()):
            return None
        return holder

    # -- internals ---------------------------------------------------------------------------

    def _fenced(self, conn: Connection) -> bool:
        """In a cache commit's transaction: whether it may write (no fence, or held)."""
        claim = self._fence
        if claim is None:
            return True
        sent_at = time.monotonic()
        return _answered(claim, not claim.lost and self._hold(conn, claim), sent_at)

    def _hold(self, conn: Connection, claim: Claim, *, settle: bool = False) -> bool:
        """Take or extend ``claim`` in ``conn``'s transaction (settled: the done marker);
        whether it is the delivery's. The row stays locked until the transaction ends."""
        params = self._claim_params(claim)
        if settle:
            now = params["b_now"]
            done_until = None if self.run_expires is None else now + self.run_expires
            params.update(b_holder=claim.done_value, b_until=done_until)
        # A claim no write of ours has proven yet (a first delivery's, taken with its first
        # write) has no row, most likely: inserting first saves a statement.
        if claim.proven_at is None and self._insert_claim(conn, claim, params):
            return True
        if conn.execute(_TAKE, params).rowcount:
            return True
        return claim.proven_at is not None and self._insert_claim(conn, claim, params)

    def _insert_claim(self, conn: Connection, claim: Claim, params: dict[str, Any]) -> bool:
        """Insert ``claim``'s row unless there is one; whether it was inserted."""
        row = {
            "namespace": self.namespace,
            "key": claim.key,
            "holder": params["b_holder"],
            "expires_at": params["b_until"],
        }
        return insert_if_new(conn, _INSERT_NEW[conn.dialect.name], row)

    def _claim_params(self, claim: Claim) -> dict[str, Any]:
        now = self._clock()
        return {
            "b_namespace": self.namespace,
            "b_key": claim.key,
            "b_token": claim.token,
            "b_now": now,
            "b_holder": claim.token,
            "b_until": now + claim.ttl,
        }

    @reconnecting
    def _take(self, claim: Claim) -> bool:
        with self._connection(write=True) as conn:
            return self._hold(conn, claim)

    @reconnecting
    def _look(self, claim: Claim) -> tuple[str | None, float | None]:
        with self._connection() as conn:
            row = conn.execute(_LOOK, self._claim_params(claim)).first()
        return (None, None) if row is None else (str(row[0]), row[1])

    @reconnecting
    def _replace(self, claim: Claim, holder: str) -> bool:
        with self._connection(write=True) as conn:
            params = {**self._claim_params(claim), "b_old": holder}
            return bool(conn.execute(_REPLACE, params).rowcount)


def _answered(claim: Claim, held: bool, sent_at: float) -> bool:
    """Learn from a fenced write's answer whether ``claim`` is still the delivery's."""
    if held:
        claim.proven(sent_at)
        return True
    claim.lose("its write was refused")
    return False
