"""Cache policies: keys, composition, scoping, and failure to compute a key."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest

from celery_taskengine import cache_policies as cp
from celery_taskengine.cache_policies import (
    DEFAULT,
    INPUTS,
    NO_CACHE,
    RUN_ID,
    TASK_SOURCE,
    CacheKeyFnPolicy,
    CompoundPolicy,
    Inputs,
    IsolationLevel,
    KeyContext,
    compute_transaction_key,
    hash_objects,
)


def make_ctx(
    task_name: str = "add", run_id: str = "run-1", source: str = "def add(x, y): ..."
) -> KeyContext:
    return KeyContext(task_name=task_name, run_id=run_id, task_source=lambda: source)


def key_of(policy: cp.CachePolicy, inputs: dict[str, Any], ctx: KeyContext | None = None) -> Any:
    return policy.compute_key(ctx or make_ctx(), inputs)


def isort_order(name: str) -> tuple[int, str]:
    """Ruff's RUF022 order: CONSTANTS, then Classes, then functions, each alphabetical."""
    return (0 if name.isupper() else 1 if name[:1].isupper() else 2, name)


def test_public_api_is_sorted() -> None:
    assert cp.__all__ == sorted(cp.__all__, key=isort_order)
    assert all(hasattr(cp, name) for name in cp.__all__)


# --- Inputs --------------------------------------------------------------------------------


def test_inputs_key_ignores_argument_order() -> None:
    assert key_of(INPUTS, {"x": 1, "y": 2}) == key_of(INPUTS, {"y": 2, "x": 1})


def test_inputs_key_changes_when_a_value_changes() -> None:
    assert key_of(INPUTS, {"x": 1}) != key_of(INPUTS, {"x": 2})


@pytest.mark.parametrize(
    "inputs",
    [{"x": 1}, {"x": True}, {"x": "1"}, {"x": None}, {"x": 0.0}, {"x": -0.0}, {"x": "s" * 300}],
)
def test_inputs_keys_remembered_for_plain_scalars_are_the_hashed_ones(
    inputs: dict[str, Any],
) -> None:
    for _ in range(2):  # the second time from the memo, where it applies
        assert key_of(INPUTS, inputs) == cp.hash_objects(inputs)


def test_equal_scalars_of_different_types_keep_different_keys() -> None:
    keys = {key_of(INPUTS, {"x": value}) for value in (1, True, 1.0, "1")}

    assert len(keys) == 4


def test_inputs_key_is_none_when_no_inputs_remain() -> None:
    assert key_of(INPUTS, {}) is None
    assert key_of(INPUTS - "x", {"x": 1}) is None


def test_subtracting_a_name_excludes_that_argument_from_a_new_policy() -> None:
    policy = INPUTS - "client"

    assert policy == Inputs(exclude=("client",))
    assert INPUTS.exclude == ()
    assert key_of(policy, {"x": 1, "client": object()}) == key_of(INPUTS, {"x": 1})


def test_exclude_given_as_a_bare_string_is_one_name() -> None:
    assert Inputs(exclude="client").exclude == ("client",)  # type: ignore[arg-type]


def test_subtracting_from_other_policies_changes_nothing() -> None:
    assert TASK_SOURCE - "x" == TASK_SOURCE
    assert RUN_ID - "x" == RUN_ID


# --- NO_CACHE and composition -------------------------------------------------------------


def test_no_cache_never_gives_a_key() -> None:
    assert key_of(NO_CACHE, {"x": 1}) is None


@pytest.mark.parametrize("policy", [INPUTS, TASK_SOURCE, RUN_ID, DEFAULT, INPUTS - "x"])
def test_no_cache_is_neutral_under_addition(policy: cp.CachePolicy) -> None:
    assert NO_CACHE + policy == policy
    assert policy + NO_CACHE == policy


def test_compound_flattens_nested_compounds_and_merges_inputs_last() -> None:
    nested = (INPUTS - "a") + (TASK_SOURCE + (Inputs(exclude=("b",)) + RUN_ID))

    assert isinstance(nested, CompoundPolicy)
    assert nested.policies == (TASK_SOURCE, RUN_ID, Inputs(exclude=("a", "b")))


def test_compound_subtraction_reaches_its_inputs() -> None:
    policy = (INPUTS + RUN_ID) - "client"

    assert isinstance(policy, CompoundPolicy)
    assert policy.policies == (RUN_ID, Inputs(exclude=("client",)))


def test_compound_key_hashes_member_keys_in_order() -> None:
    ctx = make_ctx()
    inputs = {"x": 1}
    source_then_run = CompoundPolicy((TASK_SOURCE, RUN_ID))

    assert key_of(source_then_run, inputs, ctx) == hash_objects(
        key_of(TASK_SOURCE, inputs, ctx), "run-1"
    )
    assert key_of(source_then_run, inputs) != key_of(CompoundPolicy((RUN_ID, TASK_SOURCE)), inputs)


def test_compound_key_skips_missing_member_keys() -> None:
    assert key_of(INPUTS + RUN_ID, {}) == hash_objects("run-1")
    assert key_of(CompoundPolicy((INPUTS, NO_CACHE)), {}) is None


def test_default_is_task_source_run_id_and_inputs() -> None:
    assert isinstance(DEFAULT, CompoundPolicy)
    assert DEFAULT.policies == (TASK_SOURCE, RUN_ID, INPUTS)
    assert DEFAULT == INPUTS + TASK_SOURCE + RUN_ID


def test_run_id_key_differs_by_run_id() -> None:
    assert key_of(RUN_ID, {}, make_ctx(run_id="a")) == "a"
    assert key_of(DEFAULT, {"x": 1}, make_ctx(run_id="a")) != key_of(
        DEFAULT, {"x": 1}, make_ctx(run_id="b")
    )


def test_task_source_key_changes_when_source_changes() -> None:
    old = key_of(TASK_SOURCE, {}, make_ctx(source="def f(): return 1"))
    new = key_of(TASK_SOURCE, {}, make_ctx(source="def f(): return 2"))

    assert old == hash_objects("def f(): return 1")
    assert old != new


def test_task_source_is_read_only_when_a_policy_needs_it() -> None:
    calls: list[int] = []

    def source() -> str:
        calls.append(1)
        return "src"

    ctx = KeyContext(task_name="t", run_id="r", task_source=source)
    compute_transaction_key(INPUTS + RUN_ID, ctx, {"x": 1})
    assert calls == []
    compute_transaction_key(DEFAULT, ctx, {"x": 1})
    assert calls == [1]


# --- settings -----------------------------------------------------------------------------


def test_configure_returns_a_copy_with_the_given_settings() -> None:
    storage = object()
    configured = INPUTS.configure(isolation_level=IsolationLevel.SERIALIZABLE)
    again = configured.configure(key_storage=storage)

    assert INPUTS.isolation_level is None
    assert isinstance(configured, Inputs)
    assert configured.isolation_level is IsolationLevel.SERIALIZABLE
    assert again.isolation_level is IsolationLevel.SERIALIZABLE
    assert again.key_storage is storage
    assert configured.key_storage is None


@pytest.mark.parametrize(
    ("setting", "a", "b", "message"),
    [
        (
            "isolation_level",
            IsolationLevel.SERIALIZABLE,
            IsolationLevel.READ_COMMITTED,
            "Cannot add CachePolicies with different isolation levels.",
        ),
        ("key_storage", "s1", "s2", "Cannot add CachePolicies with different storage locations."),
        (
            "lock_manager",
            "m1",
            "m2",
            "Cannot add CachePolicies with different lock implementations.",
        ),
    ],
)
def test_adding_policies_with_conflicting_settings_raises(
    setting: str, a: Any, b: Any, message: str
) -> None:
    left = INPUTS.configure(**{setting: a})
    right = TASK_SOURCE.configure(**{setting: b})

    with pytest.raises(ValueError) as excinfo:
        left + right
    assert str(excinfo.value) == message
    with pytest.raises(ValueError):
        NO_CACHE.configure(**{setting: a}) + right


def test_compound_keeps_the_setting_configured_on_either_side() -> None:
    serializable = IsolationLevel.SERIALIZABLE

    assert (INPUTS.configure(isolation_level=serializable) + RUN_ID).isolation_level is serializable
    assert (RUN_ID + INPUTS.configure(isolation_level=serializable)).isolation_level is serializable
    assert (DEFAULT.configure(lock_manager="m") + NO_CACHE).lock_manager == "m"
    assert (NO_CACHE.configure(lock_manager="m") + INPUTS).lock_manager == "m"


def test_enum_values_are_their_names() -> None:
    assert IsolationLevel("SERIALIZABLE") is IsolationLevel.SERIALIZABLE
    assert [mode.value for mode in cp.CommitMode] == ["EAGER", "LAZY", "OFF"]


# --- compute_transaction_key ----------------------------------------------------------------


def test_policy_keys_are_scoped_by_task_name() -> None:
    inputs = {"x": 1}
    add = compute_transaction_key(INPUTS, make_ctx(task_name="add"), inputs)
    mul = compute_transaction_key(INPUTS, make_ctx(task_name="mul"), inputs)

    assert add == f"add/{hash_objects(inputs)}"
    assert mul == f"mul/{hash_objects(inputs)}"


def test_cache_key_fn_keys_are_not_scoped() -> None:
    seen: list[tuple[KeyContext, dict[str, Any]]] = []

    def key_fn(context: KeyContext, parameters: dict[str, Any]) -> str:
        seen.append((context, parameters))
        return f"sum-{parameters['x']}"

    ctx = make_ctx(task_name="add")
    assert compute_transaction_key(CacheKeyFnPolicy(key_fn), ctx, {"x": 1}) == "sum-1"
    assert compute_transaction_key(CacheKeyFnPolicy(key_fn), make_ctx("mul"), {"x": 1}) == "sum-1"
    assert seen[0] == (ctx, {"x": 1})
    assert type(seen[0][1]) is dict


def test_cache_key_fn_returning_none_gives_no_key() -> None:
    policy = CacheKeyFnPolicy(lambda context, parameters: None)

    assert compute_transaction_key(policy, make_ctx(), {"x": 1}) is None


def test_result_storage_key_template_is_formatted_and_not_scoped() -> None:
    key = compute_transaction_key(
        None,
        make_ctx(task_name="add", run_id="r-7"),
        {"x": 3},
        result_storage_key="{task_name}-{run_id}-{parameters[x]}",
    )

    assert key == "add-r-7-3"


def test_a_policy_takes_precedence_over_result_storage_key() -> None:
    assert compute_transaction_key(NO_CACHE, make_ctx(), {"x": 1}, result_storage_key="k") is None


def test_no_policy_and_no_storage_key_gives_no_key() -> None:
    assert compute_transaction_key(None, make_ctx(), {"x": 1}) is None


def assert_uncached_with_warning(
    caplog: pytest.LogCaptureFixture, compute: Callable[[], str | None], reason: str
) -> None:
    with caplog.at_level(logging.WARNING, logger=cp.__name__):
        assert compute() is None
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "'add'" in record.getMessage()
    assert "result will not be cached" in record.getMessage()
    assert reason in record.getMessage()


def test_unhashable_input_runs_uncached_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    inputs = {"lock": threading.Lock()}

    assert_uncached_with_warning(
        caplog, lambda: compute_transaction_key(DEFAULT, make_ctx(), inputs), 'INPUTS - "name"'
    )


def test_key_fn_that_raises_runs_uncached_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def key_fn(context: KeyContext, parameters: dict[str, Any]) -> str:
        raise RuntimeError("no key today")

    policy = CacheKeyFnPolicy(key_fn)
    assert_uncached_with_warning(
        caplog, lambda: compute_transaction_key(policy, make_ctx(), {}), "no key today"
    )


def test_key_fn_returning_a_non_string_runs_uncached_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = CacheKeyFnPolicy(lambda context, parameters: 42)  # type: ignore[arg-type,return-value]
    assert_uncached_with_warning(
        caplog, lambda: compute_transaction_key(policy, make_ctx(), {}), "got int"
    )


def test_storage_key_template_with_unknown_field_runs_uncached_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert_uncached_with_warning(
        caplog,
        lambda: compute_transaction_key(None, make_ctx(), {}, result_storage_key="{nope}"),
        "KeyError",
    )


# --- hash_objects ---------------------------------------------------------------------------


def test_hash_objects_ignores_dict_insertion_order() -> None:
    assert hash_objects({"a": 1, "b": {"c": 2, "d": 3}}) == hash_objects(
        {"b": {"d": 3, "c": 2}, "a": 1}
    )


def test_hash_objects_is_the_same_in_every_process() -> None:
    # Pinned digests: a seed-dependent encoding (e.g. of a set) would break these in most runs.
    assert hash_objects({"x": 1}) == "176cb8c584d56463500ebdeafdf41579"
    assert hash_objects({"alpha", "beta", "gamma"}) == "f50ae99b0a2589b762c9df9bf24235b0"


def test_hash_objects_distinguishes_argument_positions() -> None:
    assert hash_objects("a", "b") != hash_objects("b", "a")


def test_hash_objects_falls_back_to_pickle() -> None:
    assert hash_objects(complex(1, 2)) == hash_objects(complex(1, 2))
    assert hash_objects(complex(1, 2)) != hash_objects(complex(1, 3))


def test_hash_objects_error_says_how_to_fix_it() -> None:
    with pytest.raises(ValueError) as excinfo:
        hash_objects(threading.Lock())

    message = str(excinfo.value)
    assert "lock" in message
    assert 'INPUTS - "name"' in message
    assert "cache_key_fn" in message
    assert "NO_CACHE" in message
