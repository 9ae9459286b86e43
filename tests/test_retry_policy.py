"""Where a retry delay comes from (SPEC §3): the delay list, exponential backoff and jitter.

Randomness is injected, so every jitter test uses a seeded ``random.Random`` and is exact.
"""

from __future__ import annotations

import random
import statistics

import pytest

from celery_taskengine import exponential_backoff
from celery_taskengine._engine.retry_policy import MAX_RETRY_DELAYS, delay_for_retry, jittered

# --- the delay list -------------------------------------------------------------------------


def test_no_delays_means_retry_at_once() -> None:
    assert delay_for_retry((), 0) == 0.0
    assert delay_for_retry((), 7) == 0.0


def test_the_delay_before_retry_k_plus_one_is_the_kth_entry() -> None:
    delays = (1.0, 2.0, 3.0)

    assert [delay_for_retry(delays, k) for k in range(3)] == [1.0, 2.0, 3.0]


def test_the_last_delay_repeats_once_the_list_runs_out() -> None:
    delays = (1.0, 5.0)

    assert [delay_for_retry(delays, k) for k in range(5)] == [1.0, 5.0, 5.0, 5.0, 5.0]


# --- exponential backoff --------------------------------------------------------------------


def test_exponential_backoff_doubles_from_the_factor() -> None:
    assert exponential_backoff(0.1)(4) == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert exponential_backoff(backoff_factor=3)(3) == [3, 6, 12]


def test_exponential_backoff_gives_nothing_for_no_retries() -> None:
    assert exponential_backoff(1)(0) == []


def test_exponential_backoff_stops_at_the_delay_cap() -> None:
    assert len(exponential_backoff(1)(1000)) == MAX_RETRY_DELAYS == 50


# --- jitter ---------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [None, 0, 0.0])
def test_no_jitter_factor_leaves_the_delay_alone(factor: float | None) -> None:
    assert jittered(2.5, factor, random.Random(1)) == 2.5


def test_a_zero_delay_stays_zero_with_jitter() -> None:
    assert jittered(0.0, 0.5, random.Random(1)) == 0.0


@pytest.mark.parametrize(
    ("factor", "lowest"),
    [(0.3, 0.752), (0.5, 0.629), (1.0, 0.415)],
)
def test_jitter_keeps_delays_within_the_reference_window(factor: float, lowest: float) -> None:
    # Given a delay of 10 s and many draws from a seeded generator
    rng = random.Random(20260101)
    draws = [jittered(10.0, factor, rng) for _ in range(5000)]

    # Then every draw lies in about [c * d, (1 + j) * d] (c as measured in Prefect, to three
    # places), and both ends are reached
    assert min(draws) >= (lowest - 0.001) * 10.0
    assert max(draws) <= (1 + factor) * 10.0 + 1e-9
    assert min(draws) < (lowest + 0.02) * 10.0
    assert max(draws) > (1 + factor - 0.02) * 10.0


@pytest.mark.parametrize("factor", [0.1, 0.3, 0.5, 1.0, 2.0])
def test_jitter_keeps_the_mean_near_the_delay(factor: float) -> None:
    rng = random.Random(7)
    draws = [jittered(4.0, factor, rng) for _ in range(20000)]

    assert statistics.fmean(draws) == pytest.approx(4.0, rel=0.03)


def test_jitter_spreads_delays_out() -> None:
    rng = random.Random(3)
    draws = {round(jittered(1.0, 0.5, rng), 6) for _ in range(100)}

    assert len(draws) > 90


def test_jitter_is_reproducible_with_the_same_seed() -> None:
    first = [jittered(1.0, 0.5, random.Random(42)) for _ in range(3)]
    second = [jittered(1.0, 0.5, random.Random(42)) for _ in range(3)]

    assert first == second


def test_a_huge_jitter_factor_does_not_overflow() -> None:
    value = jittered(1.0, 5000.0, random.Random(1))

    assert 0.0 <= value <= 5001.0
