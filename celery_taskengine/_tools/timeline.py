"""A run's state history as text: one line per state, with how long the run stayed in it.

Shared by the CLI (``celery-taskengine runs show``) and the embedded quickstart, so both show
a run the same way::

       +0.0 ms  Pending              0.1 ms
       +0.1 ms  Running              101 ms
       +101 ms  AwaitingRetry        100 ms  retry scheduled in 100 ms
       +201 ms  Retrying              12 ms
       +213 ms  Completed
"""

from __future__ import annotations

from datetime import datetime, timezone

from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine.states import State, utcnow

__all__ = ["format_duration", "format_timeline"]

#: State names are padded to this width, so timelines of different runs line up.
_NAME_WIDTH = len("AwaitingRetry")


def format_duration(seconds: float) -> str:
    """``seconds`` for people: ``"0.4 ms"``, ``"12 ms"``, ``"1.50 s"``, ``"2 min 05 s"``."""
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def format_timeline(run: TaskRun, *, now: datetime | None = None) -> list[str]:
    """One line per state entered: offset from the first state, name, time spent, note.

    The time spent in a state runs until the next state; a final state has none, and the time
    in a last state that is not final is counted up to ``now`` (default: the current time) and
    marked "so far".
    """
    history = run.state_history
    if not history:
        return ["(no states recorded)"]
    start = _aware(history[0].timestamp)
    width = max(_NAME_WIDTH, *(len(state.name) for state in history))
    lines = []
    for index, state in enumerate(history):
        offset = format_duration((_aware(state.timestamp) - start).total_seconds())
        spent = _time_in_state(history, index, now)
        line = f"{'+' + offset:>10}  {state.name:<{width}}  {spent:>12}  {_note(state)}"
        lines.append(line.rstrip())
    return lines


def _time_in_state(history: list[State], index: int, now: datetime | None) -> str:
    state = history[index]
    if index + 1 < len(history):
        return format_duration(_seconds(state, _aware(history[index + 1].timestamp)))
    if state.is_final():
        return ""
    return f"{format_duration(_seconds(state, _aware(now or utcnow())))} so far"


def _seconds(state: State, until: datetime) -> float:
    return max(0.0, (until - _aware(state.timestamp)).total_seconds())


def _note(state: State) -> str:
    if state.scheduled_time is not None:
        return (
            f"retry scheduled in {format_duration(_seconds(state, _aware(state.scheduled_time)))}"
        )
    return state.message or ""


def _aware(moment: datetime) -> datetime:
    # Records written by other tools may carry naive times; the engine's are UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
