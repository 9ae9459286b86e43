"""Who is told of a run's states: observers, composed in a list as middleware is.

A run's environment holds one :class:`RunObservers`; the ``Record`` step hands it every state
the run enters. Each :class:`RunObserver` does one job (write the run record, keep the
delivery's claim, show Celery's task meta, send events, reset a generator's items) and
ignores the hooks it has no use for. A worker composes all of them; a local run only its
store's recorder.

The commands observers produce for one state are gathered in one :class:`StateWrites` and sent
together by whoever owns the connection (the Redis record writer), so adding an observer
adds no round trip. Pure: no Celery, no Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from celery_taskengine.states import StateType

if TYPE_CHECKING:
    from celery_taskengine._engine.task_run import TaskRun
    from celery_taskengine._store.protocol import ResultStore
    from celery_taskengine.states import State

__all__ = [
    "NO_OBSERVERS",
    "RunObserver",
    "RunObservers",
    "SavedOnCreate",
    "StateWrites",
    "local_observer",
]


class StateWrites:
    """What the observers of one state write, sent together.

    ``commands`` are the store's own (Redis command tuples); ``send`` is set by the observer
    that owns the connection and called once every observer has seen the state. ``dropped``:
    nothing of this state may be written (the delivery lost its claim). ``held``: the state is
    written when the run ends (:meth:`RunObservers.end`), not now.
    """

    __slots__ = ("commands", "dropped", "held", "send")

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []
        self.dropped = False
        self.held = False
        self.send: Callable[[StateWrites], None] | None = None

    def add(self, command: tuple[Any, ...]) -> None:
        self.commands.append(command)

    def drop(self) -> None:
        """Write nothing of this state, whatever an observer added or adds."""
        self.dropped = True
        self.commands.clear()


class RunObserver:
    """One job done on a run's states; every hook does nothing unless overridden."""

    #: Whether the hooks add to, drop or send a state's batch. A run observed only by
    #: observers that do not (they write on their own, or only look) gets no batch at all.
    writes_batch = True

    def on_state(self, run: TaskRun, state: State, batch: StateWrites) -> None:
        """``run`` entered ``state`` (already in its history); add writes to ``batch``."""

    def on_attempt(self, run: TaskRun, state: State, batch: StateWrites) -> None:
        """An attempt starts (``state`` is its Running), after every ``on_state``."""

    def on_end(self, run: TaskRun, batch: StateWrites) -> None:
        """The engine returned: its transaction is over. ``batch`` holds what was held."""


class RunObservers:
    """The observers of one environment, in order; called for every state a run enters.

    Only the hooks an observer overrides are called (looked up once, here): recording is on
    every run's hot path.
    """

    __slots__ = ("_held", "_on_attempt", "_on_end", "_on_state", "_writes", "observers")

    def __init__(self, observers: Sequence[RunObserver] = ()) -> None:
        self.observers = tuple(observers)
        self._on_state = _overridden(self.observers, "on_state")
        self._on_attempt = _overridden(self.observers, "on_attempt")
        self._on_end = _overridden(self.observers, "on_end")
        self._writes = any(observer.writes_batch for observer in self.observers)
        #: The batch of a state to be written at :meth:`end` (one delivery's final state).
        self._held: StateWrites | None = None

    def __bool__(self) -> bool:
        return bool(self.observers)

    def __call__(self, run: TaskRun, state: State) -> None:
        """Tell every observer; then send the state's batch, or hold it for :meth:`end`."""
        batch = StateWrites() if self._writes else _NO_WRITES
        for on_state in self._on_state:
            on_state(run, state, batch)
        if self._on_attempt and state.type is StateType.RUNNING:
            for on_attempt in self._on_attempt:
                on_attempt(run, state, batch)
        if batch.held and self._writes:
            self._held = batch
        elif batch.send is not None:
            batch.send(batch)

    def end(self, run: TaskRun) -> None:
        """The engine returned: observers finish (the held state is written now)."""
        batch, self._held = self._held or StateWrites(), None
        batch.send = None
        for on_end in self._on_end:
            on_end(run, batch)
        if batch.send is not None:
            batch.send(batch)


def _overridden(observers: tuple[RunObserver, ...], hook: str) -> tuple[Callable[..., None], ...]:
    """The bound ``hook`` of each observer that overrides the base's no-op."""
    base = getattr(RunObserver, hook)
    return tuple(getattr(o, hook) for o in observers if getattr(type(o), hook) is not base)


#: The one batch handed to observers that never write to it (see ``writes_batch``).
_NO_WRITES = StateWrites()

#: The environment of a run nobody observes (a run built to be saved by its caller).
NO_OBSERVERS = RunObservers()


class SavedOnCreate(RunObserver):
    """Saves a run when it is created, on a store that then keeps the live run object."""

    __slots__ = ("store",)
    writes_batch = False

    def __init__(self, store: ResultStore) -> None:
        self.store = store

    def on_state(self, run: TaskRun, state: State, batch: StateWrites) -> None:
        if len(run.state_history) == 1:
            self.store.save_run(run)


def local_observer(store: ResultStore) -> RunObserver:
    """What a local run on ``store`` needs observed: its store's recorder, or, on a store that
    keeps the live run object, one save when the run is created."""
    recorder = store.local_recorder()
    return recorder if recorder is not None else SavedOnCreate(store)
