"""Where a retry delay comes from: the delay list, exponential backoff, jitter, and the time
the retry is due (AwaitingRetry's scheduled time, from which a worker's countdown is taken).

Pure functions; randomness is passed in so tests can be exact.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

__all__ = [
    "MAX_RETRY_DELAYS",
    "delay_for_retry",
    "exponential_backoff",
    "full_jitter",
    "jittered",
    "retry_time",
]

#: More delays than this is almost certainly a mistake (Prefect has the same cap).
MAX_RETRY_DELAYS = 50


def exponential_backoff(backoff_factor: float) -> Callable[[int], list[float]]:
    """A ``retry_delay_seconds`` callable giving ``factor * 2**i`` seconds for retry ``i``.

    ``exponential_backoff(0.1)`` with 4 retries gives ``[0.1, 0.2, 0.4, 0.8]``.
    """

    def delays(retries: int) -> list[float]:
        return [backoff_factor * 2**i for i in range(min(retries, MAX_RETRY_DELAYS))]

    return delays


def delay_for_retry(delays: Sequence[float], retries_done: int) -> float:
    """Seconds to wait before the next attempt, after ``retries_done`` retries.

    The last delay repeats once the list runs out; an empty list means retry at once.
    """
    if not delays:
        return 0.0
    return float(delays[min(retries_done, len(delays) - 1)])


def jittered(delay: float, jitter_factor: float | None, rng: random.Random) -> float:
    """Spread ``delay`` over about ``[0.63 d, (1 + j) d]`` keeping the mean near ``d``.

    The draw is exponential with mean ``d``, clamped to that window, so many clients that
    failed together do not retry together. No jitter for a zero delay or factor.
    """
    if not jitter_factor or delay <= 0:
        return delay
    upper = 1 + jitter_factor
    # The lower clamp is chosen so that the clamped distribution keeps its mean near d.
    lower = math.log2(2**upper / (2**upper - 1)) if upper < MAX_RETRY_DELAYS else 0.0
    cdf_low = 1 - math.exp(-lower)
    cdf_high = 1 - math.exp(-upper)
    u = rng.uniform(cdf_low, cdf_high)
    return -math.log(max(1 - u, 1e-10)) * delay


def full_jitter(delay: float, rng: random.Random) -> float:
    """A whole number of seconds drawn evenly from ``[0, delay]``: Celery's ``retry_jitter``.

    The same draw as Celery's ``get_exponential_backoff_interval(full_jitter=True)``, so a
    task moved from Celery keeps its spread of retry times.
    """
    if delay <= 0:
        return 0.0
    return float(rng.randrange(int(delay) + 1))


def retry_time(now: datetime, delay: float) -> datetime:
    """When a retry ``delay`` seconds after ``now`` is due; every scheduled time is computed
    here, one way."""
    return now + timedelta(seconds=delay)
