"""State entry for the engine core: the one place a run's state changes.

Every state a run enters goes through :meth:`StateEntry.enter_state`, which checks the
transition, updates the record and returns the ``Record`` step the caller yields: the drivers
persist and publish it. Inputs, the run name and state hooks live here too, since they decide
what the run enters before and around its attempts.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery_taskengine._engine.run_scope import run_scope
from celery_taskengine._engine.steps import ComputeKey, Record, RunHook, Steps, hook_name
from celery_taskengine.states import TRANSITIONS, State, StateType, aggregate_states

if TYPE_CHECKING:
    from celery_taskengine._celery.options import TaskOptions
    from celery_taskengine._engine.core_env import EngineTask, RunEnvironment
    from celery_taskengine._engine.task_run import TaskRun

__all__ = ["FINAL", "StateEntry", "describe", "returned_state"]

logger = logging.getLogger("celery_taskengine.task_runs")

FINAL = frozenset({StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED})


class StateEntry:
    """The run, its options and environment, and how it enters states."""

    task: EngineTask
    options: TaskOptions
    run: TaskRun
    env: RunEnvironment
    wait_for: Iterable[Any] | None
    is_async: bool
    is_generator: bool
    #: The values the function is called with (upstream states resolved); a copy is made
    #: only when something is resolved.
    call_parameters: dict[str, Any]
    #: Why the arguments do not fit their models (``pydantic=True``): the run fails at
    #: its first attempt, never retried, since no attempt could pass.
    invalid_inputs: ValueError | None

    @property
    def state(self) -> State:
        assert self.run.state is not None, "the run has no state before initialize_run"
        return self.run.state

    def enter_state(self, state: State, *, first: bool = False) -> Record:
        """Enter ``state`` in the record; return the ``Record`` step that persists it.

        Not a routine of its own because it runs several times per run: the caller yields
        the step, which saves a generator per state on the hot path.
        """
        run = self.run
        current = run.state
        kind = state.type
        if current is not None and kind not in TRANSITIONS[current.type]:
            raise RuntimeError(f"illegal transition {current} -> {state} in run {run.id}")
        run.state = state
        run.state_history.append(state)
        if kind is StateType.RUNNING:
            if run.start_time is None:
                run.start_time = state.timestamp
        elif kind in FINAL:
            run.end_time = state.timestamp
        return Record(run, state, first)

    def set_state(self, state: State) -> Steps[State]:
        """Enter ``state``: check the transition, update the record, and persist it."""
        yield self.enter_state(state)
        return state

    def enter_running(self, *, retrying: bool) -> Steps[None]:
        self.run.run_count += 1
        yield self.enter_state(self._new(StateType.RUNNING, "Retrying" if retrying else "Running"))
        if self.options.on_running:
            yield from self.call_hooks(self.state)

    def call_hooks(self, state: State) -> Steps[None]:
        """Run the hooks for ``state``; a hook that raises is logged and changes nothing."""
        kind = _HOOKS_FOR.get(state.type)
        if kind is None:
            return
        for hook in getattr(self.options, kind):
            try:
                yield RunHook(hook, (self.task, self.run, state), kind)
            except Exception:
                logger.exception(
                    "%s: an error was encountered while running hook %r",
                    self.run.id,
                    hook_name(hook),
                )

    def log_finished_message(self) -> None:
        if logger.isEnabledFor(logging.INFO):
            # Text, not the State: a handler that pickles records (a QueueHandler, as Celery's
            # test worker uses) would otherwise carry the run's result or exception with it.
            logger.info("%s: finished in state %s", self.run.id, str(self.state))

    def _new(
        self,
        kind: StateType,
        name: str,
        message: str | None = None,
        data: Any = None,
        now: datetime | None = None,
    ) -> State:
        return _state(kind, name, message, now or self.env.clock(), data)

    def _scope(self) -> Any:
        return run_scope(self.run, log_prints=self.options.log_prints)

    # -- before the first attempt -------------------------------------------------------------
    def _resolve_inputs(self) -> State | None:
        """Replace upstream states by their values; NotReady if one did not complete."""
        for item in self.wait_for or ():
            if isinstance(item, State) and not item.is_completed():
                return self._not_ready(item)
        for name, value in self.run.parameters.items():
            if isinstance(value, State):
                if not value.is_completed():
                    return self._not_ready(value)
                if self.call_parameters is self.run.parameters:
                    self.call_parameters = dict(self.run.parameters)
                self.call_parameters[name] = value.data
        return None

    def _not_ready(self, upstream: State) -> State:
        message = f"Upstream task run in state {upstream.name!r} did not reach a 'COMPLETED' state."
        return self._new(StateType.PENDING, "NotReady", message)

    def _render_run_name(self) -> Steps[str]:
        """The run's name from ``task_run_name``; a callable is user code, so a step."""
        template = self.options.task_run_name
        if template is None:
            return self.run.name
        if isinstance(template, str):
            return template.format(**self.call_parameters)
        if "parameters" in inspect.signature(template).parameters:
            name = yield ComputeKey(template, (), {"parameters": dict(self.call_parameters)})
        else:
            name = yield ComputeKey(template)
        if not isinstance(name, str):
            raise TypeError(f"task_run_name callable must return a str, got {type(name).__name__}")
        return name


#: The slots of a State, in field order, written through their descriptors: a frozen
#: dataclass's ``__init__`` sets each through ``object.__setattr__``, and the core makes three
#: States per run. Checked here so a new field of State fails at import, not silently.
_FIELDS = ("type", "name", "message", "timestamp", "scheduled_time", "data")
if tuple(field.name for field in dataclasses.fields(State)) != _FIELDS:
    raise ImportError("State's fields changed: update core_states._state")
_SET_TYPE, _SET_NAME, _SET_MESSAGE, _SET_TIMESTAMP, _SET_SCHEDULED, _SET_DATA = (
    State.__dict__[name].__set__ for name in _FIELDS
)


def _state(kind: StateType, name: str, message: str | None, now: datetime, data: Any) -> State:
    """``State(kind, name, message, now, None, data)`` for a ``name`` that is never empty."""
    state: State = object.__new__(State)
    _SET_TYPE(state, kind)
    _SET_NAME(state, name)
    _SET_MESSAGE(state, message)
    _SET_TIMESTAMP(state, now)
    _SET_SCHEDULED(state, None)
    _SET_DATA(state, data)
    return state


_HOOKS_FOR: dict[StateType, str] = {
    StateType.FAILED: "on_failure",
    StateType.COMPLETED: "on_completion",
    StateType.RUNNING: "on_running",
}


_COLLECTIONS = (list, tuple, set)  # a tuple: isinstance checks it quicker than a union


def returned_state(result: Any) -> State | None:
    """The State a task returned (several aggregate into one), or ``None`` for a value."""
    if isinstance(result, State):
        return result
    if (
        isinstance(result, _COLLECTIONS)
        and result
        and all(isinstance(item, State) for item in result)
    ):
        return aggregate_states(result)
    return None


def describe(exc_or_state: BaseException | State) -> str:
    if isinstance(exc_or_state, State):
        return str(exc_or_state)
    return f"{type(exc_or_state).__name__}: {exc_or_state}"
