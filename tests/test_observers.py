"""Observers of a run's states: no-op hooks by default, composed in order, one batch a state."""

from __future__ import annotations

from typing import Any

from celery_taskengine._engine.observers import (
    RunObserver,
    RunObservers,
    SavedOnCreate,
    StateWrites,
)
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine.states import Completed, Pending, Running, State


def a_run() -> TaskRun:
    return TaskRun(id="run-1", name="t", task_name="t", parameters={})


def enter(observers: RunObservers, run: TaskRun, state: State) -> None:
    run.state = state
    run.state_history.append(state)
    observers(run, state)


class Sender(RunObserver):
    """Adds a command for every state and sends the batch; holds the final state to the end."""

    def __init__(self, sent: list[list[tuple[Any, ...]]]) -> None:
        self.sent = sent

    def on_state(self, run: TaskRun, state: State, batch: StateWrites) -> None:
        batch.add(("SET", state.name))
        if state.is_final():
            batch.held = True
        else:
            batch.send = self.send

    def on_end(self, run: TaskRun, batch: StateWrites) -> None:
        batch.send = self.send

    def send(self, batch: StateWrites) -> None:
        if not batch.dropped:
            self.sent.append(list(batch.commands))


class Meta(RunObserver):
    def on_state(self, run: TaskRun, state: State, batch: StateWrites) -> None:
        batch.add(("META", state.name))


class Attempts(RunObserver):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_attempt(self, run: TaskRun, state: State, batch: StateWrites) -> None:
        self.seen.append(state.name)


class Dropper(RunObserver):
    def on_state(self, run: TaskRun, state: State, batch: StateWrites) -> None:
        if state.name == "Running":
            batch.drop()


def test_a_base_observer_does_nothing_for_any_hook() -> None:
    observer, run, batch = RunObserver(), a_run(), StateWrites()
    observer.on_state(run, Running(), batch)
    observer.on_attempt(run, Running(), batch)
    observer.on_end(run, batch)
    assert batch.commands == [] and batch.send is None and not batch.held


def test_every_observers_commands_for_one_state_go_out_in_one_send() -> None:
    sent: list[list[tuple[Any, ...]]] = []
    observers, run = RunObservers([Sender(sent), Meta()]), a_run()
    enter(observers, run, Running())
    assert sent == [[("SET", "Running"), ("META", "Running")]]


def test_a_held_state_is_sent_when_the_run_ends_not_when_it_is_entered() -> None:
    sent: list[list[tuple[Any, ...]]] = []
    observers, run = RunObservers([Sender(sent), Meta()]), a_run()
    enter(observers, run, Completed(data=1))
    assert sent == []
    observers.end(run)
    assert sent == [[("SET", "Completed"), ("META", "Completed")]]


def test_a_dropped_state_writes_nothing_of_any_observer() -> None:
    sent: list[list[tuple[Any, ...]]] = []
    observers, run = RunObservers([Dropper(), Sender(sent), Meta()]), a_run()
    enter(observers, run, Running())
    assert sent == []


def test_on_attempt_is_called_once_per_running_only() -> None:
    attempts = Attempts()
    observers, run = RunObservers([attempts]), a_run()
    for state in (Pending(), Running(), Completed(data=1)):
        enter(observers, run, state)
    assert attempts.seen == ["Running"]


def test_a_store_that_keeps_the_live_run_saves_it_once_when_it_is_created() -> None:
    saved: list[str] = []

    class Store:
        def save_run(self, run: TaskRun) -> None:
            saved.append(run.state.name if run.state else "")

    observers, run = RunObservers([SavedOnCreate(Store())]), a_run()  # type: ignore[arg-type]
    for state in (Pending(), Running(), Completed(data=1)):
        enter(observers, run, state)
    assert saved == ["Pending"]
