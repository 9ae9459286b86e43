"""Claims: one live delivery per Celery message, even when the broker hands it out twice.

Redis has no real acknowledgements: a message a worker holds longer than the visibility
timeout (an attempt that runs long, a message waiting in a prefetch buffer, a retry's countdown
on the worker's timer) is given out again while the first delivery is alive, or after another
delivery completed it. A delivery cannot tell such a duplicate from a crashed delivery's
redelivery by looking at the run record (Running either way), so each delivery claims its
message: ``claim:<task id>:<Celery retries>`` holds a token naming the delivery (unique across
hosts and containers), taken only when the key is free (``NX``), expiring unless renewed (a
crashed holder's claim lapses), renewed while the attempt runs (see
:mod:`~celery_taskengine._store.renewer`), and set to ``done:<token>`` once the delivery has
written its outcome (kept as long as run records).

The claim is a fencing token: the run record, the done marker, the cache commit and Celery's
stored result are written by scripts that first compare the claim with the writer's token, so
an attempt that lost its claim (paused past its lifetime, taken over) writes nothing over the
new holder's outcome, whenever it resumes. Each such write is one script call, not a read
followed by a write.

A delivery learns it lost its claim from any answer: a renewal, the cache commit, Celery's
result; and before it writes its outcome it asks, unless an answer proved the claim its own
recently enough that it cannot have lapsed since. It then writes nothing more, and the bridge
ends the delivery with ``Ignore``, leaving the outcome to the holder.

A delivery that cannot claim waits, at most until the holder's claim would lapse unless its
holder renews it; then it has nothing to do (the holder finished: ``done``) or takes over a
crashed holder's run. The cheap path, a young message's first delivery, takes its claim in the
script that writes the run's Running record, without waiting for an answer: no other delivery
of a message can exist before the broker's visibility timeout has passed since it was sent
(see :mod:`~celery_taskengine._celery.message_age`), and should one exist anyway (a task id sent
twice), the fenced writes refuse to write.

The Redis store keeps claims as keys written by scripts; the SQL store keeps them as rows
(see :mod:`~celery_taskengine._store.sql_claims`), with the same semantics. A memory store's
runs live in one process's memory, with nothing shared to fence.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from celery_taskengine._store.retrying import patience_from_policy
from celery_taskengine._store.run_index import INDEX_FN, index_call
from celery_taskengine.errors import StorePermissionError, StoreUnavailableError

__all__ = [
    "CLAIM_TTL_SECONDS",
    "Claim",
    "ClaimKeeper",
    "announce_wait",
    "claim_or_wait",
    "is_done",
    "new_token",
    "store_result_fenced",
]

logger = logging.getLogger(__name__)

#: Seconds a claim lives unless renewed: how long a crashed delivery's message waits before
#: another delivery takes its run over. Renewed every third of it while the attempt runs.
CLAIM_TTL_SECONDS = 15.0
#: Seconds a duplicate waits past the moment the holder's claim would lapse, so that a holder
#: renewing on time is not taken over.
LAPSE_MARGIN_SECONDS = 0.25
_DONE = b"done"
#: The refusals Celery's result store waits out here (Celery's ensure() waits out outages).
_PASSING = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)

# Every fenced write starts so: the claim must be the writer's, or free (taken now: a lapsed
# claim nobody else took, or a first delivery whose claim rides with this write).
# KEYS[1]: claim. ARGV[1]: token, ARGV[2]: the claim's lifetime in ms.
_FENCE = """
local holder = redis.call('get', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
if not holder then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
local function put(key, value, px)
  if px == '-' then redis.call('del', key)
  elseif px ~= '0' then redis.call('set', key, value, 'PX', px)
  else redis.call('set', key, value) end
end
"""
# The run record, then the done marker when settling.
_RECORD = """
put(KEYS[2], ARGV[3], ARGV[4])
if ARGV[5] ~= '' then put(KEYS[1], ARGV[5], ARGV[6]) end
"""
#: KEYS: claim, run. ARGV: token, ttl ms, document, run px, done value ('' keeps the claim),
#: done px.
RECORD_LUA = _FENCE + _RECORD + "return 1\n"
#: RECORD_LUA that also indexes the run (see run_index): its KEYS and ARGV, then the index's.
RECORD_INDEXED_LUA = _FENCE + INDEX_FN + _RECORD + index_call(3, 7) + "return 1\n"
#: KEYS: claim, cache record. ARGV: token, ttl ms, record, px ('0': none, '-': delete).
CACHE_LUA = _FENCE + "put(KEYS[2], ARGV[3], ARGV[4])\nreturn 1\n"
#: Celery's stored result, written (and published, as Celery does) while the claim is the
#: writer's, settled by it, or free. KEYS: claim, meta. ARGV: token, done value, meta, px.
META_LUA = """
local holder = redis.call('get', KEYS[1])
if holder and holder ~= ARGV[1] and holder ~= ARGV[2] then return 0 end
if ARGV[4] ~= '0' then redis.call('set', KEYS[2], ARGV[3], 'PX', ARGV[4])
else redis.call('set', KEYS[2], ARGV[3]) end
redis.call('publish', KEYS[2], ARGV[3])
return 1
"""
#: KEYS: claim. ARGV: token, ttl ms, done value. 1: kept (or settled by us), 0: lost.
RENEW_LUA = """
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
if holder == ARGV[3] then return 1 end
if not holder then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""
#: Frees a claim its holder hands back unsettled. KEYS: claim. ARGV: token.
FREE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# Replaces a holder whose claim cannot lapse (no expiry: written by something else than us).
_REPLACE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 end
return 0
"""


class ClaimKeeper(Protocol):
    """Where a claim lives: what its lease needs of the store."""

    def renew_claim(self, claim: Claim) -> bool: ...


def new_token() -> str:
    """A delivery's token: random (unique across hosts and containers), with the pid for logs."""
    return f"{uuid.uuid4().hex}-{os.getpid()}"


def is_done(holder: bytes | str | None) -> bool:
    """Whether a claim's value says its delivery wrote its outcome."""
    if isinstance(holder, str):
        holder = holder.encode()
    return holder is not None and holder.startswith(_DONE)


@dataclass(eq=False)
class Claim:
    """A delivery's claim on its message, and what this process knows of it.

    A lease for the process's renewer. ``lost`` is set once any answer from the store shows
    another delivery holds it; from then on the attempt writes nothing.
    """

    store: ClaimKeeper = field(repr=False)
    key: str
    run_id: str
    ttl: float
    token: str = field(default_factory=new_token)
    #: Monotonic time an answer last proved the claim ours (when that question was sent).
    proven_at: float | None = None
    #: Monotonic time an unanswered take was sent (the cheap path), trusted as proof.
    assumed_at: float | None = None
    lost: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.run_id

    @property
    def done_value(self) -> str:
        return f"done:{self.token}"

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    def is_sure(self) -> bool:
        """Whether the claim is surely still ours: proven recently enough that it cannot have
        lapsed since (or, on the cheap path, taken so recently that no other delivery can
        exist yet). Otherwise a write must ask Redis first (:meth:`confirm`)."""
        since = self.proven_at if self.proven_at is not None else self.assumed_at
        return not self.lost and since is not None and time.monotonic() - since < self.ttl * 2 / 3

    def proven(self, sent_at: float) -> None:
        with self._lock:
            if self.proven_at is None or sent_at > self.proven_at:
                self.proven_at = sent_at

    def lose(self, how: str) -> None:
        """Another delivery has the claim: log it once; the attempt writes nothing more."""
        with self._lock:
            first, self.lost = not self.lost, True
        if first:
            logger.warning(
                "%s: this delivery lost its claim on the message (%s): another delivery took "
                "the run over; this attempt's outcome is not written",
                self.run_id,
                how,
            )

    def record_command(
        self,
        run_key: str,
        document: str | bytes,
        run_px: str,
        *,
        settle: bool,
        index: tuple[list[str], list[Any]] | None = None,
    ) -> tuple[Any, ...]:
        """The fenced write of the run record (and, with ``settle``, of the done marker), with
        its run-index entry when given ``index`` (KEYS and ARGV, see run_index)."""
        done = self.done_value if settle else ""
        args = (self.token, self.ttl_ms, document, run_px, done, run_px)
        if index is None:
            return ("EVAL", RECORD_LUA, 2, self.key, run_key, *args)
        keys, index_args = index
        all_keys = (self.key, run_key, *keys)
        return ("EVAL", RECORD_INDEXED_LUA, len(all_keys), *all_keys, *args, *index_args)

    def confirm(self) -> bool:
        """Whether the claim is still ours, asking Redis (one round trip, which also extends
        it) unless that is sure already; a claim found taken is lost."""
        if self.lost:
            return False
        try:
            if self.is_sure() or self.renew():
                return True
        except (StoreUnavailableError, StorePermissionError):
            return True  # cannot ask now: the write itself is fenced (and its refusal logged)
        self.lose("found before writing the outcome")
        return False

    def fences_results_of(self, backend: Any) -> bool:
        """Whether Celery's results on ``backend`` can be fenced by this claim (a Redis one)."""
        return isinstance(getattr(backend, "client", None), redis.Redis)

    # -- the renewer's lease -------------------------------------------------------------

    def renew(self) -> bool:
        sent_at = time.monotonic()
        kept = self.store.renew_claim(self)
        if kept:
            self.proven(sent_at)
        return kept

    def renew_every(self) -> float:
        return self.ttl / 3

    def on_lost(self) -> None:
        self.lose("found when renewing it")


def claim_or_wait(client: redis.Redis, claim: Claim, poll: float) -> bool:
    """Take ``claim``, waiting while another live delivery holds it.

    ``True``: ours now (a crashed holder's run is ours to take over). ``False``: the holder
    finished with this message; this delivery has nothing to do. The wait for one holder lasts
    until its claim would lapse (its PTTL, plus a margin); a holder that keeps renewing is
    waited for, one that has stopped is taken over.
    """
    announced = False
    stuck_since: float | None = None
    while True:
        sent_at = time.monotonic()
        if client.set(claim.key, claim.token, nx=True, px=claim.ttl_ms):
            claim.proven(sent_at)
            return True
        pipe = client.pipeline(transaction=False)
        pipe.get(claim.key)
        pipe.pttl(claim.key)
        holder, pttl = pipe.execute()
        if holder is None or pttl == -2:
            continue  # lapsed in between: take it now
        if is_done(holder):
            return False
        if _text(holder) == claim.token:  # taken by a try whose answer a dropped connection lost
            claim.proven(sent_at)
            return True
        if not announced:
            announced = True
            announce_wait(claim, holder)
        if pttl < 0:  # a claim that cannot lapse: replaced once a lifetime has passed
            stuck_since = stuck_since or time.monotonic()
            if time.monotonic() - stuck_since > claim.ttl + LAPSE_MARGIN_SECONDS:
                sent_at = time.monotonic()
                args = (holder, claim.token, claim.ttl_ms)
                if client.eval(_REPLACE_LUA, 1, claim.key, *args):
                    claim.proven(sent_at)
                    return True
            pttl = int(poll * 1000)
        time.sleep(min(poll, pttl / 1000 + LAPSE_MARGIN_SECONDS))


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def announce_wait(claim: Claim, holder: bytes | str) -> None:
    logger.warning(
        "%s is being run by another delivery (%s): the broker handed the message out again "
        "(visibility timeout shorter than the run, its countdown or its wait in a prefetch "
        "buffer?); waiting for that delivery to end",
        claim.run_id,
        _text(holder),
    )


def store_result_fenced(
    backend: Any,
    claim: Claim,
    key: str,
    value: Any,
    px: int | None,
    *,
    wait: tuple[Any, ...] | None = None,
) -> bool:
    """Store Celery's result ``value`` under ``key`` (and publish it, as Celery does) only if
    ``claim`` is still the delivery's, or settled by it; one script call, followed by
    ``wait`` (a ``WAIT`` for replicas, see replicas) in the same round trip, retried as
    Celery retries its own writes. ``False`` (logged, nothing stored) if another delivery
    has it."""
    if claim.lost:
        return False
    fence = (claim.key, key, claim.token, claim.done_value)
    command = ("EVAL", META_LUA, 2, *fence, value, str(px or 0))
    # Celery's ensure() waits out an outage; a full or demoted server is waited out here, as
    # long again (a plain task's result would be lost to it).
    policy = patience_from_policy(getattr(backend, "retry_policy", None))
    patience = dataclasses.replace(policy, errors=_PASSING)
    store = functools.partial(backend.ensure, _run_then_wait, (backend.client, command, wait))
    try:
        stored = bool(patience.call(store, what="storing Celery's result", run_id=claim.run_id))
    except _PASSING as exc:
        logger.error("%s: Celery's result is not stored: %s: %s", claim.run_id,
                     type(exc).__name__, exc)  # fmt: skip
        raise
    except redis.exceptions.NoPermissionError as exc:
        # The claim cannot be read (its user lost the engine's keys): Celery stores the
        # outcome as for a plain task, so the caller still gets it; said with the run id.
        logger.error("%s: Celery's result stored without its claim's fence: %s", claim.run_id, exc)
        backend.set(key, value)  # Celery's own write (and publish), with its retries
        return True
    if not stored:
        claim.lose("Celery's result was not stored")
    return stored


def _run_then_wait(
    client: redis.Redis, command: tuple[Any, ...], wait: tuple[Any, ...] | None
) -> Any:
    """``command``'s answer, once ``wait`` (if any) has followed it in the same round trip."""
    if wait is None:
        return client.execute_command(*command)  # type: ignore[no-untyped-call]
    pipe = client.pipeline(transaction=False)
    pipe.execute_command(*command)  # type: ignore[no-untyped-call]
    pipe.execute_command(*wait)  # type: ignore[no-untyped-call]
    # Raised here, not by the pipeline: redis-py before 5.3 puts the whole command (the
    # script and the result) into a pipeline's error message.
    answer = pipe.execute(raise_on_error=False)[0]
    if isinstance(answer, Exception):
        raise answer
    return answer
