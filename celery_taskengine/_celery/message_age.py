"""A message's age: whether the broker may have handed it out before.

kombu's Redis transport has no real acknowledgements: it gives an unacknowledged message out
again once the visibility timeout has passed since a worker took it, even from a worker's
prefetch buffer (Celery acknowledges a message only when it starts, by default). A worker that
knows a message cannot have been handed out before claims it cheaply (see
:mod:`~celery_taskengine._store.claims`); otherwise it claims with a round trip, and waits for
or defers to the other delivery. So every engine message carries the time it was sent.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

__all__ = ["SENT_AT_HEADER", "may_be_duplicate", "stamp"]

#: The message header holding the wall-clock time (seconds since the epoch) it was published.
SENT_AT_HEADER = "taskengine_sent_at"


def stamp(options: dict[str, Any]) -> None:
    """Add the send time to the headers of a message about to be published with ``options``
    (a retry's message gets its own, not the first message's)."""
    options["headers"] = {**(options.get("headers") or {}), SENT_AT_HEADER: time.time()}


def may_be_duplicate(app: Any, request: Any) -> bool:
    """Whether the broker may have handed this message out before: it is a retry, redelivered,
    has a countdown (held unacknowledged on a worker's timer), or is old.

    Redis gives an unacknowledged message out again once the visibility timeout has passed
    since a worker took it, even from a worker's prefetch buffer (Celery acknowledges it only
    when it starts). A message sent less than half that long ago cannot have been, even with
    the producer's and the worker's clocks apart by up to that much; one with no send time
    (published by ``send_task``) may have been.
    """
    redelivered = (request.delivery_info or {}).get("redelivered")
    if request.retries or redelivered or request.eta:
        return True
    limit = _duplicate_age(app)
    if limit is None or request.is_eager:
        return False
    sent_at = getattr(request, SENT_AT_HEADER, None)
    if not isinstance(sent_at, int | float):
        return True
    return time.time() - sent_at >= limit


def _duplicate_age(app: Any) -> float | None:
    """Seconds after which the app's broker may hand a message out twice (a fraction of its
    visibility timeout); ``None`` for brokers that never do (acknowledgements are real)."""
    limit = _duplicate_ages.get(app, False)
    if limit is False:
        url = app.conf.broker_url or ""
        first = (url[0] if isinstance(url, list | tuple) else str(url)).split(";", 1)[0]
        transport = first.split("://", 1)[0].split("+", 1)[0].lower()  # redis+socket: redis
        if transport in _VISIBILITY_TRANSPORTS:
            options = app.conf.broker_transport_options or {}
            timeout = float(options.get("visibility_timeout") or _REDIS_VISIBILITY_TIMEOUT)
            limit = timeout * _DUPLICATE_AGE_FRACTION
        else:
            limit = None
        _duplicate_ages[app] = limit
    return limit


#: Brokers that restore unacknowledged messages after a visibility timeout (kombu's Redis).
_VISIBILITY_TRANSPORTS = frozenset({"redis", "rediss", "sentinel"})
#: kombu's default ``visibility_timeout`` for Redis, in seconds.
_REDIS_VISIBILITY_TIMEOUT = 3600.0
#: The fraction of it after which a message claims with a round trip.
_DUPLICATE_AGE_FRACTION = 0.5
_duplicate_ages: weakref.WeakKeyDictionary[Any, float | None] = weakref.WeakKeyDictionary()
