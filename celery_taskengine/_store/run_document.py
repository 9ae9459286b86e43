"""A run record's JSON document, built up state by state.

A worker saves its run at every state change. The document is the one
:meth:`~celery_taskengine._engine.task_run.TaskRun.to_document` gives (``run_from_document`` reads
both), but parameters and the states already entered never change, so they are encoded once,
and states are written as JSON directly rather than through dicts: on the hot path this is
several times cheaper.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from json.encoder import encode_basestring_ascii

from celery_taskengine._engine.task_run import (
    DOCUMENT_VERSION,
    TaskRun,
    _jsonable,
    encode_exception,
)
from celery_taskengine.errors import SerializationError
from celery_taskengine.states import State, StateType

__all__ = ["RunDocument", "encode_run"]

_ENCODER = json.JSONEncoder(separators=(",", ":"))
_json_str: Callable[[str], str] = encode_basestring_ascii  # a JSON string literal, in C


def _not_json(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# json's C encoder, made once: JSONEncoder.encode() makes one per call, a third of its cost.
# No circular-reference check (that needs a fresh dict per call): a cycle ends in
# RecursionError, and the checked encoder then reports it as json.dumps would.
_c_encoder = getattr(json.encoder, "c_make_encoder", None)
_fast_encode = (
    _c_encoder(None, _not_json, encode_basestring_ascii, None, ":", ",", False, False, True)
    if _c_encoder is not None
    else None
)


def _to_json(value: object) -> str:
    """``json.dumps(value, separators=(",", ":"))``, faster."""
    if _fast_encode is not None:
        try:
            return "".join(_fast_encode(value, 0))
        except RecursionError:
            pass
    return _ENCODER.encode(value)


class RunDocument:
    """A run's JSON document (as :meth:`TaskRun.to_document` gives it), built incrementally.

    A run is saved at every state change; its parameters and the states already entered never
    change, so they are encoded once.
    """

    def __init__(self, run: TaskRun) -> None:
        try:
            self._parameters = _to_json(run.parameters)
        except (TypeError, ValueError):  # some value is not JSON: its repr stands in
            parameters = {name: _jsonable(value) for name, value in run.parameters.items()}
            self._parameters = _to_json(parameters)
        self._head = (
            f'{{"v":{DOCUMENT_VERSION},"id":{_json_str(run.id)},'
            f'"task_name":{_json_str(run.task_name)}'
        )
        self._tags = _to_json(sorted(run.tags)) if run.tags else "[]"
        self._states: list[str] = []
        #: The last moments written, as JSON: a run's start and end times are the
        #: timestamps of states in its history (the same objects), written once.
        self._times: list[tuple[datetime, str]] = []

    def encode(self, run: TaskRun) -> str:
        history = run.state_history[:]  # one moment's history: another thread may add to it
        while len(self._states) < len(history) - 1:
            state = history[len(self._states)]
            self._states.append(_state_json(state, self._time(state.timestamp)))
        states = self._states[: max(0, len(history) - 1)]
        if history:
            last = history[-1]
            states = [*states, _state_json(last, self._time(last.timestamp), with_data=True)]
        return (
            f'{self._head},"name":{_json_str(run.name)},"parameters":{self._parameters},'
            f'"tags":{self._tags},"run_count":{run.run_count},'
            f'"start_time":{self._time(run.start_time)},"end_time":{self._time(run.end_time)},'
            f'"state_history":[{",".join(states)}]}}'
        )

    def _time(self, moment: datetime | None) -> str:
        """``moment`` as JSON, from the last few written when it is one of them."""
        if moment is None:
            return "null"
        for known, text in self._times:
            if known is moment:
                return text
        text = f'"{moment.isoformat()}"'
        self._times = [*self._times[-3:], (moment, text)]
        return text


def encode_run(run: TaskRun) -> str:
    """The run's JSON document; raises :class:`SerializationError` if it cannot be encoded."""
    try:
        return RunDocument(run).encode(run)
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"run record {run.id!r} cannot be encoded: {exc}") from exc


#: Where a state's JSON starts, by (type, name): the same few states are written over and over.
_STATE_HEADS: dict[tuple[StateType, str], str] = {}


def _state_json(state: State, timestamp: str, *, with_data: bool = False) -> str:
    """``_state_to_dict(state)`` as JSON, written directly: this runs several times per run."""
    head = _STATE_HEADS.get((state.type, state.name))
    if head is None:
        head = f'{{"type":"{state.type.value}","name":{_json_str(state.name)},'
        if len(_STATE_HEADS) < 256:  # names a user gave to returned states: a bounded few
            _STATE_HEADS[(state.type, state.name)] = head
    data = state.data
    extra = "" if not with_data or data is None else _data_json(data)
    message = "null" if state.message is None else _json_str(state.message)
    scheduled = _json_time(state.scheduled_time)
    return (
        f'{head}"message":{message},"timestamp":{timestamp},"scheduled_time":{scheduled}{extra}}}'
    )


def _data_json(data: object) -> str:
    """The ``"data"`` (or ``"exception"``) member of a state's dict, with its leading comma."""
    if isinstance(data, BaseException):
        return f',"exception":{_to_json(encode_exception(data))}'
    try:
        return f',"data":{_to_json(data)}'
    except (TypeError, ValueError):  # as _jsonable: what JSON cannot carry, its repr stands in
        return f',"data":{_json_str(repr(data))}'


def _json_time(moment: datetime | None) -> str:
    return "null" if moment is None else f'"{moment.isoformat()}"'
