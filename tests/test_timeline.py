"""``timeline``: a run's state history as lines, with offsets and the time spent in each state."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._tools.timeline import format_duration, format_timeline
from celery_taskengine.states import State, StateType

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def run_with(*states: State) -> TaskRun:
    return TaskRun(
        id="r", name="t", task_name="m.t", state=states[-1] if states else None,
        state_history=list(states),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0.0 ms"),
        (0.0004, "0.4 ms"),
        (0.012, "12 ms"),
        (0.9994, "999 ms"),
        (1.5, "1.50 s"),
        (59.0, "59.00 s"),
        (125.0, "2 min 05 s"),
    ],
)
def test_durations_read_in_the_unit_that_fits(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_each_state_shows_its_offset_and_the_time_until_the_next_state() -> None:
    lines = format_timeline(
        run_with(
            State(StateType.PENDING, timestamp=at(0)),
            State(StateType.RUNNING, timestamp=at(0.002)),
            State(StateType.SCHEDULED, "AwaitingRetry", timestamp=at(0.1), scheduled_time=at(1.1)),
            State(StateType.RUNNING, "Retrying", timestamp=at(1.1)),
            State(StateType.COMPLETED, timestamp=at(1.5)),
        )
    )
    assert [line.split()[2] for line in lines] == [
        "Pending", "Running", "AwaitingRetry", "Retrying", "Completed",
    ]  # fmt: skip
    assert lines[1].split()[:5] == ["+2.0", "ms", "Running", "98", "ms"]
    assert lines[2].endswith("1.00 s  retry scheduled in 1.00 s")
    assert lines[3].split()[:5] == ["+1.10", "s", "Retrying", "400", "ms"]
    # A final state has no time spent: nothing follows it
    assert lines[4].split() == ["+1.50", "s", "Completed"]


def test_a_failed_state_shows_its_message() -> None:
    lines = format_timeline(
        run_with(
            State(StateType.PENDING, timestamp=at(0)),
            State(StateType.FAILED, "TimedOut", "Task run exceeded timeout", timestamp=at(0.3)),
        )
    )
    assert lines[1].split(None, 3)[2:] == ["TimedOut", "Task run exceeded timeout"]


def test_a_state_not_final_yet_is_timed_up_to_now_and_says_so() -> None:
    lines = format_timeline(
        run_with(
            State(StateType.PENDING, timestamp=at(0)),
            State(StateType.RUNNING, timestamp=at(1)),
        ),
        now=at(3.5),
    )
    assert lines[1].endswith("Running        2.50 s so far")


def test_naive_timestamps_are_read_as_utc() -> None:
    naive = T0.replace(tzinfo=None)
    lines = format_timeline(
        run_with(
            State(StateType.PENDING, timestamp=naive),
            State(StateType.COMPLETED, timestamp=at(0.05)),
        )
    )
    assert lines[0].split()[3:5] == ["50", "ms"]


def test_a_run_without_states_says_so() -> None:
    assert format_timeline(run_with()) == ["(no states recorded)"]
