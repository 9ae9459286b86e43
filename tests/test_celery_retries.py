"""Celery's retry options on engine tasks: translated at decoration with Celery 5.7's meaning.

Delays are checked against Celery's own ``get_exponential_backoff_interval``; runs are local
(the worker side is in test_celery_idioms_worker.py).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.utils.time import get_exponential_backoff_interval

from celery_taskengine import task
from celery_taskengine._celery.celery_retries import ONLY_SELF_RETRY, AutoRetryCondition, translate
from celery_taskengine._celery.options import build_options
from celery_taskengine._engine.retry_policy import full_jitter


@pytest.fixture
def app() -> Iterator[Celery]:
    own = Celery("celery-retries-tests", set_as_current=False)
    yield own
    own.close()


def body() -> None:
    return None


def options(**given: Any) -> Any:
    return build_options(body, given)


@pytest.mark.parametrize("backoff", [True, 1, 2, 3, 0.5, 2.7])
@pytest.mark.parametrize("maximum", [None, 5, 600, 1000])
@pytest.mark.parametrize("retries", [1, 4, 12])
def test_backoff_delays_are_celerys_for_the_same_settings(
    backoff: Any, maximum: int | None, retries: int
) -> None:
    given: dict[str, Any] = {"retry_backoff": backoff, "max_retries": retries}
    if maximum is not None:
        given["retry_backoff_max"] = maximum

    got = options(**given, retry_jitter=False)

    factor = int(max(1.0, float(backoff)))
    expected = [
        float(get_exponential_backoff_interval(factor, n, maximum or 600, full_jitter=False))
        for n in range(retries)
    ]
    assert got.retries == retries
    assert list(got.retry_delays) == expected
    assert got.retry_full_jitter is False


def test_retry_jitter_draws_like_celerys_full_jitter() -> None:
    got = options(retry_backoff=True, max_retries=5)  # retry_jitter defaults to True
    rng = random.Random(7)

    draws = [full_jitter(8.0, rng) for _ in range(2000)]

    assert got.retry_full_jitter is True
    assert set(draws) == {float(n) for n in range(9)}  # every whole second in [0, 8]
    random.seed(7)
    celery_draws = {get_exponential_backoff_interval(1, 3, 600, True) for _ in range(2000)}
    assert celery_draws == {n for n in range(9)}


def test_autoretry_for_alone_means_celerys_three_retries_every_180_seconds() -> None:
    got = options(autoretry_for=(ConnectionError,))

    assert got.retries == 3
    assert got.retry_delays == (180.0,)
    assert got.retry_condition_fn == AutoRetryCondition((ConnectionError,), ())


def test_max_retries_alone_means_that_many_retries_asked_for_by_self_retry() -> None:
    got = options(max_retries=3)

    assert got.retries == 3
    assert got.retry_condition_fn is ONLY_SELF_RETRY  # as in Celery: no exception by itself
    assert options(retries=3).retry_condition_fn is None  # the engine's own: every exception


def test_retry_kwargs_and_default_retry_delay_set_count_and_delay() -> None:
    assert options(retry_kwargs={"max_retries": 5, "countdown": 2}).retry_delays == (2.0,)
    assert options(retry_kwargs={"max_retries": 5}).retries == 5
    assert options(default_retry_delay=7, max_retries=1).retry_delays == (7.0,)


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"retries": 4, "max_retries": 1}, "'max_retries' and 'retries'"),
        ({"max_retries": 2, "retry_kwargs": {"max_retries": 3}}, "'max_retries'.*'retry_kwargs'"),
        ({"retry_delay_seconds": 5, "retry_backoff": True}, "'retry_backoff'.*'retry_delay_second"),
        ({"retry_delay_seconds": 5, "default_retry_delay": 6}, "'default_retry_delay'.*'retry_d"),
        ({"retry_jitter_factor": 0.5, "retry_backoff": True}, "'retry_jitter'.*'retry_jitter_f"),
        (
            {"retry_condition_fn": lambda *a: True, "autoretry_for": (ValueError,)},
            "'autoretry_for'.*'retry_condition_fn'",
        ),
        ({"retry_kwargs": {"queue": "q"}}, "retry_kwargs.*'queue'"),
        ({"retry_backoff": "yes"}, "retry_backoff"),
        ({"dont_autoretry_for": [3]}, "dont_autoretry_for"),
    ],
)
def test_a_celery_option_disagreeing_with_its_engine_counterpart_names_both(
    given: dict[str, Any], named: str
) -> None:
    with pytest.raises(TypeError, match=named):
        options(**given)


def test_agreeing_options_are_accepted() -> None:
    got = options(retries=3, max_retries=3, retry_delay_seconds=[1, 2, 4], retry_backoff=True,
                  retry_jitter=False)  # fmt: skip

    assert (got.retries, got.retry_delays) == (3, (1.0, 2.0, 4.0))


def test_the_condition_retries_autoretry_for_but_not_dont_autoretry_for() -> None:
    condition = translate(
        {"autoretry_for": (OSError,), "dont_autoretry_for": (FileNotFoundError,)}
    ).options["retry_condition_fn"]

    def seen(exc: BaseException | None) -> bool:
        state = type("S", (), {"data": exc})()
        return bool(condition(None, None, state))

    assert seen(ConnectionError()) is True
    assert seen(FileNotFoundError()) is False
    assert seen(ValueError()) is False
    assert seen(None) is False


def test_a_local_run_retries_only_what_autoretry_for_names(app: Celery) -> None:
    calls: list[str] = []

    @task(app=app, autoretry_for=(ConnectionError,), max_retries=2, retry_kwargs={"countdown": 0})
    def flaky(kind: str) -> None:
        calls.append(kind)
        raise ConnectionError("down") if kind == "conn" else ValueError("bad")

    with pytest.raises(ConnectionError):
        flaky("conn")
    with pytest.raises(ValueError):
        flaky("value")

    assert calls == ["conn", "conn", "conn", "value"]


def test_with_options_setting_the_engine_counterpart_replaces_the_celery_option(
    app: Celery,
) -> None:
    t = task(app=app, max_retries=3)(body)

    assert t.with_options(retries=5).engine_options.retries == 5
    assert t.max_retries == 3
