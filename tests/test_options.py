"""Decoration-time options (SPEC §1, §8): validation, Celery passthrough, copies, inference."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import celery
import pytest
from celery import Celery, current_app

from celery_taskengine import ReservedArgumentError, Task, exponential_backoff, task
from celery_taskengine.cache_policies import DEFAULT, INPUTS, NO_CACHE, CacheKeyFnPolicy


def hook(task: Any, task_run: Any, state: Any) -> None:
    return None


def body() -> None:
    return None


@pytest.fixture
def app() -> Any:
    """An app of the test's own, so registrations are easy to see."""
    own = Celery("options-tests", set_as_current=False)
    yield own
    own.close()


# --- bad options fail at decoration time, naming the option ---------------------------------


@pytest.mark.parametrize(
    ("options", "error", "named"),
    [
        ({"retries": -1}, ValueError, "retries"),
        ({"retries": "3"}, TypeError, "retries"),
        ({"retries": 1.5}, TypeError, "retries"),
        ({"retries": True}, TypeError, "retries"),
        ({"retry_delay_seconds": "x"}, TypeError, "retry_delay_seconds"),
        ({"retry_delay_seconds": [1, "x"]}, TypeError, "retry_delay_seconds"),
        ({"retry_delay_seconds": [-1]}, ValueError, "retry_delay_seconds"),
        ({"retries": 51, "retry_delay_seconds": [1] * 51}, ValueError, "retry_delay_seconds"),
        ({"retries": 2, "retry_delay_seconds": lambda n: 5}, TypeError, "retry_delay_seconds"),
        ({"retry_jitter_factor": -1}, ValueError, "retry_jitter_factor"),
        ({"retry_jitter_factor": "big"}, TypeError, "retry_jitter_factor"),
        ({"retry_condition_fn": "x"}, TypeError, "retry_condition_fn"),
        ({"timeout_seconds": "x"}, TypeError, "timeout_seconds"),
        ({"timeout_seconds": -1}, ValueError, "timeout_seconds"),
        ({"task_run_name": 3}, TypeError, "task_run_name"),
        ({"on_completion": hook}, TypeError, "on_completion"),
        ({"on_failure": [hook, "x"]}, TypeError, "on_failure"),
        ({"on_running": "hook"}, TypeError, "on_running"),
        ({"on_commit": hook}, TypeError, "on_commit"),
        ({"on_rollback": [3]}, TypeError, "on_rollback"),
        ({"tags": "etl"}, TypeError, "tags"),
        ({"tags": ["etl", 3]}, TypeError, "tags"),
        ({"name": ""}, TypeError, "name"),
        ({"cache_policy": "inputs"}, TypeError, "cache_policy"),
        ({"cache_key_fn": "key"}, TypeError, "cache_key_fn"),
        ({"cache_expiration": "1h"}, TypeError, "cache_expiration"),
        ({"persist_result": "yes"}, TypeError, "persist_result"),
        ({"refresh_cache": 1}, TypeError, "refresh_cache"),
        ({"log_prints": "yes"}, TypeError, "log_prints"),
        ({"result_storage_key": 3}, TypeError, "result_storage_key"),
        ({"result_serializer": 3}, TypeError, "result_serializer"),
        ({"result_serializer": "no-such-format"}, ValueError, "result_serializer"),
        ({"foo": 1}, TypeError, "foo"),
        ({"bind": "yes"}, TypeError, "bind"),
        ({"autoretry_for": ValueError}, TypeError, "autoretry_for"),
        ({"max_retries": None}, TypeError, "max_retries"),
        ({"retries": 4, "max_retries": 1}, TypeError, "max_retries.*retries"),
        ({"base": celery.Task}, TypeError, "base"),  # an engine task's base is ours
        ({"pydantic": "yes"}, TypeError, "pydantic"),
        ({"pydantic_strict": True}, TypeError, "pydantic_strict"),  # without pydantic=True
        ({"pydantic": True, "pydantic_context": 3}, TypeError, "pydantic_context"),
    ],
    ids=lambda value: next(iter(value)) if isinstance(value, dict) else "",
)
def test_a_bad_option_is_rejected_at_decoration_naming_it(
    app: Celery, options: dict[str, Any], error: type[Exception], named: str
) -> None:
    with pytest.raises(error, match=named):
        task(app=app, **options)(body)


def test_with_options_validates_the_changes_too(app: Celery) -> None:
    t = task(app=app)(body)

    with pytest.raises(ValueError, match="retries"):
        t.with_options(retries=-1)
    with pytest.raises(TypeError, match="foo"):
        t.with_options(foo=1)


@pytest.mark.parametrize("reserved", ["return_state", "wait_for"])
def test_a_reserved_parameter_name_raises_reserved_argument_error(
    app: Celery, reserved: str
) -> None:
    namespace: dict[str, Any] = {}
    exec(f"def uses_reserved({reserved}): return None", namespace)

    with pytest.raises(
        ReservedArgumentError, match=f"'{reserved}' is a reserved argument name and cannot be used"
    ):
        task(app=app)(namespace["uses_reserved"])


# --- good options are normalised once -------------------------------------------------------


def test_the_decorator_works_bare_called_and_as_a_function(app: Celery) -> None:
    def bare() -> int:
        return 1

    called = task(app=app)(bare)
    plain = task(bare)

    assert called() == 1 and plain() == 1

    @task
    def decorated() -> int:
        return 2

    assert decorated() == 2


def test_options_are_a_frozen_object(app: Celery) -> None:
    t = task(app=app, retries=2)(body)

    with pytest.raises(dataclasses.FrozenInstanceError):
        t.engine_options.retries = 5  # type: ignore[misc]


def test_times_are_normalised_to_float_seconds(app: Celery) -> None:
    t = task(
        app=app,
        timeout_seconds=timedelta(minutes=1),
        cache_expiration=timedelta(hours=1),
        retries=2,
        retry_delay_seconds=[1, timedelta(seconds=2)],
    )(body)

    options = t.engine_options
    assert options.timeout_seconds == 60.0 and isinstance(options.timeout_seconds, float)
    assert options.cache_expiration == 3600.0
    assert options.retry_delays == (1.0, 2.0)


def test_a_zero_timeout_means_no_timeout(app: Celery) -> None:
    assert task(app=app, timeout_seconds=0)(body).engine_options.timeout_seconds is None


def test_a_single_delay_becomes_a_one_item_list(app: Celery) -> None:
    t = task(app=app, retries=3, retry_delay_seconds=0.5)(body)

    assert t.engine_options.retry_delays == (0.5,)


def test_a_delay_callable_becomes_its_list(app: Celery) -> None:
    t = task(app=app, retries=4, retry_delay_seconds=exponential_backoff(0.1))(body)

    assert t.engine_options.retry_delays == pytest.approx((0.1, 0.2, 0.4, 0.8))


def test_fifty_delays_are_allowed(app: Celery) -> None:
    t = task(app=app, retries=50, retry_delay_seconds=[0.1] * 50)(body)

    assert len(t.engine_options.retry_delays) == 50


def test_hooks_are_kept_in_order(app: Celery) -> None:
    def first(*args: Any) -> None: ...

    def second(*args: Any) -> None: ...

    t = task(app=app, on_completion=[first, second], on_commit=[second, first])(body)

    assert t.engine_options.on_completion == (first, second)
    assert t.engine_options.on_commit == (second, first)


def test_the_description_defaults_to_the_docstring(app: Celery) -> None:
    def documented() -> None:
        """Does the thing."""

    assert task(app=app)(documented).engine_options.description == "Does the thing."


def test_tags_become_a_frozenset(app: Celery) -> None:
    assert task(app=app, tags=["a", "b", "a"])(body).engine_options.tags == frozenset({"a", "b"})


# --- persist_result and cache_policy inference (prefect-behaviour 1b) ----------------------


def _caching(app: Celery, **options: Any) -> tuple[Any, bool]:
    t = task(app=app, **options)(body)
    return t.engine_options.cache_policy, t.engine_options.persist_result


def test_no_caching_options_leave_the_default_policy_unpersisted(app: Celery) -> None:
    policy, persist = _caching(app)

    assert policy == DEFAULT and persist is False


def test_a_cache_policy_turns_persistence_on(app: Celery) -> None:
    policy, persist = _caching(app, cache_policy=INPUTS)

    assert policy == INPUTS and persist is True


def test_no_cache_does_not_turn_persistence_on(app: Celery) -> None:
    _, persist = _caching(app, cache_policy=NO_CACHE)

    assert persist is False


def test_a_cache_key_fn_becomes_the_policy_and_turns_persistence_on(app: Celery) -> None:
    def key_fn(context: Any, parameters: dict[str, Any]) -> str:
        return "k"

    policy, persist = _caching(app, cache_key_fn=key_fn)

    assert isinstance(policy, CacheKeyFnPolicy) and persist is True


def test_a_cache_key_fn_overrides_a_cache_policy_with_a_warning(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    def key_fn(context: Any, parameters: dict[str, Any]) -> str:
        return "k"

    with caplog.at_level(logging.WARNING):
        policy, _ = _caching(app, cache_key_fn=key_fn, cache_policy=INPUTS)

    assert isinstance(policy, CacheKeyFnPolicy)
    assert any("cache_key_fn" in r.getMessage() for r in caplog.records)


def test_a_result_storage_key_turns_persistence_on_and_replaces_the_policy(app: Celery) -> None:
    policy, persist = _caching(app, result_storage_key="k-{parameters[x]}")

    assert policy is None and persist is True


def test_a_result_serializer_turns_persistence_on(app: Celery) -> None:
    _, persist = _caching(app, result_serializer="pickle")

    assert persist is True


def test_persist_result_false_disables_caching_with_a_warning_for_a_real_policy(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        policy, persist = _caching(app, cache_policy=INPUTS, persist_result=False)

    assert policy == NO_CACHE and persist is False
    assert any("persist_result" in r.getMessage() for r in caplog.records)


def test_persist_result_true_keeps_the_default_policy(app: Celery) -> None:
    policy, persist = _caching(app, persist_result=True)

    assert policy == DEFAULT and persist is True


# --- the decorated object is a Celery task --------------------------------------------------


def test_the_decorated_object_is_a_celery_task_registered_in_its_app(app: Celery) -> None:
    def registered() -> None:
        return None

    t = task(app=app)(registered)

    assert isinstance(t, celery.Task) and isinstance(t, Task)
    assert t.app is app
    assert app.tasks[t.name] is t
    assert t.name.endswith("registered")


def test_an_explicit_name_is_the_celery_name(app: Celery) -> None:
    t = task(app=app, name="jobs.explicit")(body)

    assert t.name == "jobs.explicit"
    assert app.tasks["jobs.explicit"] is t


def test_without_an_app_the_task_resolves_to_the_current_apps_task() -> None:
    @task
    def on_current_app() -> None:
        return None

    assert on_current_app.app is current_app._get_current_object()
    resolved = on_current_app._get_current_object()  # type: ignore[attr-defined]
    assert current_app.tasks[on_current_app.name] is resolved


def test_redecorating_a_name_replaces_the_registration(app: Celery) -> None:
    first = task(app=app, name="jobs.same", retries=1)(body)
    second = task(app=app, name="jobs.same", retries=2)(body)

    assert first is not second
    assert app.tasks["jobs.same"] is second


# Celery itself deprecates the ``queue`` attribute (for task_routes) and warns, as app.task does.
@pytest.mark.filterwarnings("ignore::celery.exceptions.CDeprecationWarning")
def test_celery_options_pass_through_as_task_attributes(app: Celery) -> None:
    t = task(app=app, queue="q", acks_late=True, rate_limit="10/s", max_retries=7)(body)

    assert t.queue == "q"
    assert t.acks_late is True
    assert t.rate_limit == "10/s"
    assert t.max_retries == 7


def test_a_signature_names_the_task(app: Celery) -> None:
    def add(x: int, y: int) -> int:
        return x + y

    t = task(app=app)(add)

    signature = t.s(1, 2)
    assert signature.task == t.name
    assert tuple(signature.args) == (1, 2)


# --- with_options ---------------------------------------------------------------------------


def test_with_options_returns_a_changed_copy_and_leaves_the_original(app: Celery) -> None:
    original = task(app=app, retries=1, tags=["a"], timeout_seconds=3, acks_late=True)(body)

    copy = original.with_options(retries=5)

    assert copy is not original
    assert copy.engine_options.retries == 5
    assert original.engine_options.retries == 1
    # options not given are carried over
    assert copy.engine_options.tags == frozenset({"a"})
    assert copy.engine_options.timeout_seconds == 3.0
    assert copy.acks_late is True
    assert copy.name == original.name
    assert app.tasks[original.name] is original


def test_with_options_under_a_new_name_registers_the_copy(app: Celery) -> None:
    original = task(app=app, name="jobs.original")(body)

    copy = original.with_options(name="jobs.copy")

    assert copy.name == "jobs.copy"
    assert app.tasks["jobs.copy"] is copy
    assert app.tasks["jobs.original"] is original


def test_a_copy_runs_with_its_own_options(app: Celery) -> None:
    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        raise ValueError("x")

    original = task(app=app)(flaky)
    copy = original.with_options(retries=2)

    assert copy(return_state=True).name == "Failed"
    assert len(calls) == 3
    calls.clear()
    assert original(return_state=True).name == "Failed"
    assert len(calls) == 1


def test_hooks_given_to_with_options_replace_the_originals(app: Celery) -> None:
    seen: list[str] = []

    def make(label: str) -> Callable[..., None]:
        return lambda task, run, state: seen.append(label)

    original = task(app=app, on_completion=[make("original")])(body)
    copy = original.with_options(on_completion=[make("copy")])

    copy()
    original()

    assert seen == ["copy", "original"]
