"""The Redis store's delivery claims (a part of
:class:`~celery_taskengine._store.redis_store.RedisStore`, as its run records and streams are).

What a claim is and why is :mod:`~celery_taskengine._store.claims`; these are the store
operations behind it: a claim's key, taking it with a round trip, renewing and freeing it, the
fenced writes that learn from their answer whether it is still the delivery's, and the view of
the store an attempt commits its cache records through.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import redis

from celery_taskengine._store.claims import (
    CACHE_LUA,
    FREE_LUA,
    RENEW_LUA,
    Claim,
    claim_or_wait,
)
from celery_taskengine._store.connections import side_client
from celery_taskengine._store.retrying import Patience
from celery_taskengine.errors import StoreUnavailableError

__all__ = ["ClaimStore"]

logger = logging.getLogger(__name__)


class ClaimStore:
    """The claim operations of :class:`~celery_taskengine._store.redis_store.RedisStore`."""

    client: redis.Redis
    _prefix: str
    _available: Callable[[], AbstractContextManager[None]]
    #: The claim a view made by :meth:`fenced_by` writes cache records under.
    _fence: Claim | None = None
    _claim_renew: Any = None

    def new_claim(self, run_id: str, attempt: int, ttl: float) -> Claim:
        """A new claim (not taken yet) on the message of ``run_id``'s attempt ``attempt``
        (Celery's ``retries``), living ``ttl`` seconds unless renewed."""
        store: Any = self
        return Claim(store, f"{self._prefix}claim:{run_id}:{attempt}", run_id, ttl)

    def take_claim(self, claim: Claim, *, poll: float, patience: float = 0.0) -> bool:
        """Take ``claim`` with a round trip, waiting while a live holder has it (see
        :func:`claim_or_wait`); ``False``: another delivery settled the message.

        While Redis does not answer, tried again for up to ``patience`` seconds (as Celery
        retries its own writes), then :class:`StoreUnavailableError`.
        """
        store: Any = self
        wait = Patience(seconds=patience)
        take = functools.partial(claim_or_wait, self.client, claim, poll)
        return bool(store.call(take, "claiming its message", claim.run_id, patience=wait))

    def renew_claim(self, claim: Claim) -> bool:
        """Extend ``claim`` (or take it again if it lapsed and is free); ``False`` if another
        delivery holds it. On connections of its own: called from the renewer's thread."""
        renew = self._claim_renew
        if renew is None:  # on connections of its own: made by the first renewal
            renew = self._claim_renew = side_client(self.client).register_script(RENEW_LUA)
        args = [claim.token, claim.ttl_ms, claim.done_value]
        store: Any = self
        renewal = functools.partial(renew, keys=[claim.key], args=args)
        return bool(store.call(renewal, "renewing its claim", claim.run_id, patience=Patience()))

    def free_claim(self, claim: Claim) -> None:
        """Give up ``claim`` unsettled (if it is still ours): the message goes back to the
        broker with no outcome (Celery's ``Reject(requeue=True)``, ``Ignore``), and its next
        delivery takes the claim at once instead of waiting for it to lapse."""
        store: Any = self
        free = functools.partial(self.client.eval, FREE_LUA, 1, claim.key, claim.token)
        try:
            store.call(free, "freeing its claim", claim.run_id)
        except StoreUnavailableError:
            logger.warning("%s: could not free its claim; it lapses by itself", claim.run_id)

    def write_fenced(self, claim: Claim, command: tuple[Any, ...]) -> bool:
        """Run a fenced write built by ``claim`` (one round trip) and learn from its answer
        whether the claim is still ours; ``False`` (and the claim lost) if not."""
        sent_at = time.monotonic()
        store: Any = self
        write = functools.partial(self.client.execute_command, *command)
        answer = store.call(write, "a fenced write", claim.run_id)
        if answer:
            claim.proven(sent_at)
            return True
        claim.lose("its write was refused")
        return False

    def fenced_by(self, claim: Claim | None) -> Any:
        """This store as an attempt holding ``claim`` uses it: cache commits are written only
        while the claim is the attempt's (the same store when there is no claim)."""
        if claim is None:
            return self
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._fence = claim
        return view

    def _write_fenced_record(self, redis_key: str, raw: bytes | str, px: str) -> None:
        """A cache commit under :attr:`_fence` (``px``: ms, ``'0'`` none, ``'-'`` delete)."""
        claim = self._fence
        assert claim is not None
        if claim.lost:
            return
        args = (claim.token, claim.ttl_ms, raw, px)
        self.write_fenced(claim, ("EVAL", CACHE_LUA, 2, claim.key, redis_key, *args))
