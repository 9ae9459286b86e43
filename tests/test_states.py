"""States as values (SPEC §2), the transition table, aggregation, and the error tree (SPEC §8)."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from datetime import datetime, timedelta, timezone

import pytest

from celery_taskengine import errors
from celery_taskengine.errors import (
    CancelledRun,
    ConfigurationError,
    CrashedRun,
    FailedRun,
    PausedRun,
    ReservedArgumentError,
    RunResultError,
    TaskEngineError,
    TaskRunTimeoutError,
    UnfinishedRun,
)
from celery_taskengine.states import (
    TRANSITIONS,
    AwaitingRetry,
    Cached,
    Cancelled,
    Completed,
    Crashed,
    Failed,
    NotReady,
    Paused,
    Pending,
    Retrying,
    Running,
    Scheduled,
    State,
    StateType,
    TimedOut,
    aggregate_states,
    is_legal_transition,
)

FINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}


# --- the value ------------------------------------------------------------------------------


def test_state_types_are_the_nine_reference_types() -> None:
    assert [t.value for t in StateType] == [
        "SCHEDULED",
        "PENDING",
        "RUNNING",
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "CRASHED",
        "PAUSED",
        "CANCELLING",
    ]


@pytest.mark.parametrize("kind", list(StateType))
def test_a_state_without_a_name_is_named_after_its_type(kind: StateType) -> None:
    assert State(kind).name == kind.value.title()


@pytest.mark.parametrize("kind", list(StateType))
def test_only_completed_failed_cancelled_and_crashed_are_final(kind: StateType) -> None:
    assert State(kind).is_final() is (kind in FINAL)


def test_each_predicate_answers_for_its_own_type_only() -> None:
    predicates = {
        StateType.SCHEDULED: "is_scheduled",
        StateType.PENDING: "is_pending",
        StateType.RUNNING: "is_running",
        StateType.COMPLETED: "is_completed",
        StateType.FAILED: "is_failed",
        StateType.CANCELLED: "is_cancelled",
        StateType.CRASHED: "is_crashed",
        StateType.PAUSED: "is_paused",
    }
    for kind, own in predicates.items():
        state = State(kind)
        for predicate in predicates.values():
            assert getattr(state, predicate)() is (predicate == own), (kind, predicate)


@pytest.mark.parametrize(
    ("state", "name", "kind"),
    [
        (Pending(), "Pending", StateType.PENDING),
        (NotReady(), "NotReady", StateType.PENDING),
        (Running(), "Running", StateType.RUNNING),
        (Retrying(), "Retrying", StateType.RUNNING),
        (Completed(), "Completed", StateType.COMPLETED),
        (Cached(), "Cached", StateType.COMPLETED),
        (Failed(), "Failed", StateType.FAILED),
        (TimedOut(), "TimedOut", StateType.FAILED),
        (Crashed(), "Crashed", StateType.CRASHED),
        (Cancelled(), "Cancelled", StateType.CANCELLED),
        (Paused(), "Paused", StateType.PAUSED),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_named_states_have_the_reference_name_and_type(
    state: State, name: str, kind: StateType
) -> None:
    assert (state.name, state.type) == (name, kind)


def test_awaiting_retry_is_scheduled_at_the_given_time() -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    state = AwaitingRetry(now + timedelta(seconds=2), timestamp=now)

    assert state.type is StateType.SCHEDULED and state.name == "AwaitingRetry"
    assert state.scheduled_time is not None
    assert state.scheduled_time - state.timestamp == timedelta(seconds=2)
    assert Scheduled(now).scheduled_time == now


def test_a_state_timestamp_is_aware_utc() -> None:
    assert Completed().timestamp.tzinfo is not None
    assert Completed().timestamp.utcoffset() == timedelta(0)


def test_states_are_frozen() -> None:
    state = Completed(data=1)

    with pytest.raises(dataclasses.FrozenInstanceError):
        state.name = "Other"  # type: ignore[misc]
    assert state.with_data(2).data == 2 and state.data == 1


def test_str_shows_the_type_only_when_the_name_differs_from_it() -> None:
    assert str(Completed(message="done")) == "Completed('done')"
    assert str(Cached()) == "Cached(None, type=COMPLETED)"
    assert str(TimedOut(message="late")) == "TimedOut('late', type=FAILED)"


# --- result() -------------------------------------------------------------------------------


def test_result_of_a_completed_state_is_its_data() -> None:
    value = object()
    assert Completed(data=value).result() is value


def test_result_of_a_failed_state_raises_the_stored_exception_itself() -> None:
    error = ValueError("xyz")

    with pytest.raises(ValueError) as info:
        Failed(data=error).result()
    assert info.value is error


def test_result_without_raising_returns_the_stored_exception() -> None:
    error = ValueError("xyz")
    assert Failed(data=error).result(raise_on_failure=False) is error
    assert Crashed(data=error).result(raise_on_failure=False) is error


@pytest.mark.parametrize(
    ("state", "error"),
    [
        (Failed(message="it failed"), FailedRun),
        (TimedOut(message="it failed"), FailedRun),
        (Crashed(message="it failed"), CrashedRun),
        (Cancelled(message="it failed"), CancelledRun),
    ],
    ids=["Failed", "TimedOut", "Crashed", "Cancelled"],
)
def test_result_of_a_final_state_without_exception_raises_its_wrapper_with_the_message(
    state: State, error: type[RunResultError]
) -> None:
    with pytest.raises(error, match="it failed"):
        state.result()


def test_result_of_a_failed_state_holding_text_raises_failed_run_with_that_text() -> None:
    with pytest.raises(FailedRun, match="the reason"):
        Failed(data="the reason", message="other").result()


@pytest.mark.parametrize("state", [Pending(), NotReady(), Running(), Retrying()], ids=str)
def test_result_of_a_non_final_state_raises_unfinished_run(state: State) -> None:
    with pytest.raises(UnfinishedRun, match=f"Run is in {state.type.value} state"):
        state.result()


def test_result_of_a_paused_state_raises_paused_run() -> None:
    with pytest.raises(PausedRun):
        Paused().result()


# --- the transition table -------------------------------------------------------------------


def test_every_state_type_has_a_row_in_the_transition_table() -> None:
    assert set(TRANSITIONS) == set(StateType)


@pytest.mark.parametrize("kind", sorted(FINAL - {StateType.CRASHED}, key=str))
def test_completed_failed_and_cancelled_are_dead_ends(kind: StateType) -> None:
    assert TRANSITIONS[kind] == frozenset()


def test_a_run_is_created_in_pending_only() -> None:
    assert is_legal_transition(None, Pending())
    assert not is_legal_transition(None, Running())


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (Pending(), Running()),
        (Pending(), NotReady()),
        (Running(), Retrying()),
        (Running(), AwaitingRetry(datetime.now(timezone.utc))),
        (AwaitingRetry(datetime.now(timezone.utc)), Retrying()),
        (Running(), Completed()),
        (Running(), Cached()),
        (Running(), Failed()),
        (Running(), TimedOut()),
        (Running(), Crashed()),
        (Crashed(), Retrying()),  # a redelivered message continues a run whose worker died
    ],
    ids=lambda s: s.name,
)
def test_the_engines_transitions_are_legal(before: State, after: State) -> None:
    assert is_legal_transition(before, after)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (Completed(), Running()),
        (Failed(), Retrying()),
        (AwaitingRetry(datetime.now(timezone.utc)), Completed()),
        (Pending(), Failed()),
    ],
    ids=lambda s: s.name,
)
def test_leaving_a_final_state_or_skipping_running_is_illegal(before: State, after: State) -> None:
    assert not is_legal_transition(before, after)


# --- aggregation of returned states ---------------------------------------------------------


def test_all_completed_states_aggregate_to_completed_with_their_values() -> None:
    state = aggregate_states([Completed(data=1), Cached(data=2)])

    assert state.name == "Completed" and state.message == "All states completed."
    assert state.data == [1, 2]


def test_failed_and_crashed_states_both_count_as_failed() -> None:
    state = aggregate_states([Failed(), Crashed(), Completed()])

    assert state.name == "Failed" and state.message == "2/3 states failed."


def test_a_cancelled_state_makes_the_aggregate_cancelled() -> None:
    state = aggregate_states([Failed(), Cancelled(), Completed()])

    assert state.type is StateType.CANCELLED and state.message == "1/3 states cancelled."


def test_a_paused_state_makes_the_aggregate_paused() -> None:
    state = aggregate_states([Paused(), Completed()])

    assert state.type is StateType.PAUSED and state.message == "1/2 states paused."


# --- errors ---------------------------------------------------------------------------------


def _error_classes() -> list[type[BaseException]]:
    return [
        value
        for value in vars(errors).values()
        if inspect.isclass(value)
        and issubclass(value, BaseException)
        and value.__module__ == errors.__name__
    ]


def test_every_engine_error_derives_from_task_engine_error() -> None:
    classes = _error_classes()

    assert len(classes) >= 10
    assert all(issubclass(cls, TaskEngineError) for cls in classes)


def test_the_error_tree_in_the_docstring_names_every_error() -> None:
    assert errors.__doc__ is not None
    for cls in _error_classes():
        assert cls.__name__ in errors.__doc__


def test_errors_are_also_the_builtin_kinds_callers_expect() -> None:
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(ReservedArgumentError, ConfigurationError)
    assert issubclass(ReservedArgumentError, TypeError)
    assert issubclass(TaskRunTimeoutError, TimeoutError)
    for wrapper in (FailedRun, CrashedRun, CancelledRun, PausedRun, UnfinishedRun):
        assert issubclass(wrapper, RunResultError)


def test_task_run_timeout_error_states_the_limit_as_a_float_and_pickles() -> None:
    error = TaskRunTimeoutError(1)

    assert str(error) == "Scope timed out after 1.0 second(s)."
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, TaskRunTimeoutError) and str(copy) == str(error)
    assert copy.timeout_seconds == 1.0
