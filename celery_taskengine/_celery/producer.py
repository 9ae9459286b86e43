"""The producer side of the bridge: what ``.delay()``/``.apply_async()`` adds to Celery's.

- Arguments the task's serializer cannot encode fail here, with a
  :class:`~celery_taskengine.errors.SerializationError` naming the argument and the serializer
  (Celery's own ``EncodeError`` names neither); nothing is published.
- When the task's cache key follows from its arguments alone (its policy has no RUN_ID part,
  which would be the new task's own id) and a committed record exists, the call is answered
  from the cache: the run is recorded as Pending, Cached (the backend shows SUCCESS), and a
  :class:`CachedResult` is returned, ready at once. No message is published. Not for Celery's
  own retries (``options["retries"]``) nor for messages carrying canvas links (``link``,
  ``chain``, ``chord``, group membership): those must reach a worker. Hooks other than
  ``on_completion`` do not run for a cache hit answered here (there is no Running).
- Every message it publishes carries the time it was sent (a header): a worker claims a message
  older than part of the broker's visibility timeout with a round trip (see
  :mod:`~celery_taskengine._celery.message_age`).
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from celery import states as celery_states
from celery.result import AsyncResult, EagerResult
from kombu import serialization
from kombu.exceptions import EncodeError
from kombu.serialization import prepare_accept_content, registry

from celery_taskengine._celery import message_age
from celery_taskengine._celery.options import RESERVED_PARAMETERS
from celery_taskengine._engine.drivers import drive_sync
from celery_taskengine._engine.parameters import bind_parameters
from celery_taskengine._engine.pydantic_args import validate_parameters
from celery_taskengine._engine.run_core import RunCore, RunEnvironment
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._engine.transaction_keys import (
    key_for_any_run_id,
    key_may_ignore_run_id,
    policy_store,
)
from celery_taskengine._store.protocol import ResultStore
from celery_taskengine._store.selection import store_for_app
from celery_taskengine._store.task_meta import save_run_with_meta
from celery_taskengine.errors import SerializationError
from celery_taskengine.states import State, StateType

if TYPE_CHECKING:
    from celery_taskengine._celery.task import Task

__all__ = ["CachedResult", "apply_async", "refuse_local_only"]

logger = logging.getLogger(__name__)

#: Options that make a message part of a canvas: answering it here would break the links.
_CANVAS_OPTIONS = ("link", "link_error", "chain", "chord", "group_id")


class CachedResult(EagerResult):  # type: ignore[misc]
    """The result of a ``.delay()`` answered from the cache: ready, nothing was published.

    Behaves as an ``AsyncResult`` of a successful task; the backend holds the same SUCCESS,
    so ``AsyncResult(id)`` elsewhere agrees.
    """

    def __init__(self, task_id: str, value: Any, name: str, app: Any) -> None:
        super().__init__(task_id, value, celery_states.SUCCESS, name=name)
        self.app = app
        self.backend = app.backend

    def __repr__(self) -> str:
        return f"<CachedResult: {self.id}>"


Publish = Callable[..., AsyncResult]
# kombu ships no type hints.
_dumps: Callable[..., tuple[str, str, str | bytes]] = serialization.dumps


def apply_async(
    task: Task, publish: Publish, args: Any, kwargs: Any, options: dict[str, Any]
) -> AsyncResult:
    """Celery's ``apply_async`` (``publish``), answered from the cache when it can be."""
    args, kwargs = _shaped(task, args, kwargs)
    if "serializer" in options:
        _check_accepted(task, options["serializer"])
    if _may_answer_from_cache(task, options):
        options["task_id"] = options.get("task_id") or str(uuid.uuid4())
        hit = _answer_from_cache(task, args, kwargs, str(options["task_id"]))
        if hit is not None:
            return hit
    message_age.stamp(options)  # a worker claims an old message with a round trip
    try:
        return publish(args, kwargs, **options)
    except EncodeError as exc:
        raise serialization_error(task, args, kwargs, options, exc) from exc


def _shaped(task: Task, args: Any, kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args`` as a tuple and ``kwargs`` as a dict, or a ``TypeError`` saying which is wrong."""
    if args is None:
        args = ()
    elif isinstance(args, str | bytes | Mapping) or not isinstance(args, Iterable):
        raise TypeError(
            f"'args' of task {task.name!r} must be a list or tuple of positional arguments, "
            f"got {type(args).__qualname__!r}"
        )
    if kwargs is None:
        kwargs = {}
    elif not isinstance(kwargs, Mapping):
        raise TypeError(
            f"'kwargs' of task {task.name!r} must be a mapping of keyword arguments, "
            f"got {type(kwargs).__qualname__!r}"
        )
    return tuple(args), dict(kwargs)


def _check_accepted(task: Task, serializer: str) -> None:
    """Refuse a message serializer the app's workers would reject: its result would never come."""
    accepted = prepare_accept_content(task.app.conf.accept_content)  # type: ignore[no-untyped-call]
    content_type = registry.name_to_type.get(serializer, serializer)
    if content_type not in accepted:
        raise SerializationError(
            f"task {task.name!r} cannot be sent with serializer {serializer!r}: the app's "
            f"accept_content ({sorted(task.app.conf.accept_content)}) does not accept it, so "
            f"its workers would refuse the message; add {serializer!r} to accept_content"
        )


def serialization_error(
    task: Task, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any], exc: Any
) -> SerializationError:
    """A clear error for arguments the message serializer refused, naming the first culprit."""
    serializer = options.get("serializer") or task.serializer or task.app.conf.task_serializer
    named = [*zip(_positional_names(task, len(args)), args, strict=True), *kwargs.items()]
    for name, value in named:
        try:
            _dumps(value, serializer=serializer)
        except Exception as err:
            return SerializationError(
                f"argument {name!r} of task {task.name!r}, of type {type(value).__qualname__!r}, "
                f"cannot be serialized with {serializer!r}: {err}"
            )
    return SerializationError(
        f"the message for task {task.name!r} cannot be serialized with {serializer!r}: {exc}"
    )


def _positional_names(task: Task, count: int) -> list[str]:
    try:
        parameters = list(inspect.signature(task.run).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    names: list[str] = []
    for index in range(count):
        if index < len(parameters) and parameters[index].kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            names.append(parameters[index].name)
        else:
            names.append(f"args[{index}]")
    return names


def _may_answer_from_cache(task: Task, options: dict[str, Any]) -> bool:
    engine = task.engine_options
    if options.get("retries") or any(options.get(name) for name in _CANVAS_OPTIONS):
        return False
    if not engine.persist_result or engine.refresh_cache:
        return False
    if task.fn_kind in ("generator", "async_generator"):
        return False  # their items are the point: never read from the cache
    return key_may_ignore_run_id(engine.cache_policy, engine.result_storage_key)


def _answer_from_cache(
    task: Task, args: tuple[Any, ...], kwargs: dict[str, Any], task_id: str
) -> CachedResult | None:
    try:
        parameters = bind_parameters(task.run, args, kwargs)
    except TypeError:
        return None  # Celery's own argument check reports it
    store = _cache_store(task)
    inputs = parameters
    if task.engine_options.pydantic is not None:  # keys hash the models, as workers' do
        inputs = validate_parameters(task, parameters)
    key = key_for_any_run_id(task.engine_options, task.name, task.source_text, inputs, task_id)
    if store is None or key is None:
        return None
    record = store.read(key)
    if record is None:
        return None
    run = _cached_run(task, parameters, task_id, record.value)
    save_run_with_meta(task.app, store_for_app(task.app), run, celery_states.SUCCESS, record.value)
    logger.info("%s: answered from the cache at send time (key %r)", task_id, key)
    return CachedResult(task_id, record.value, task.name, task.app)


def _cache_store(task: Task) -> ResultStore | None:
    """Where the task's records live, if producers share it with workers."""
    named = policy_store(task.engine_options)
    if named is not None:
        return named
    store = store_for_app(task.app)
    return store if store.shared else None


def _cached_run(task: Task, parameters: dict[str, Any], task_id: str, value: Any) -> TaskRun:
    """The run record of a send-time cache hit: Pending, Cached; ``on_completion`` hooks run."""
    from celery_taskengine._engine.task_run import new_task_run

    run = new_task_run(task, parameters, task_id)
    core = RunCore(task, run, RunEnvironment(store=store_for_app(task.app)))
    drive_sync(core.initialize_run(), core.env)
    cached = State(StateType.COMPLETED, "Cached", data=value)
    drive_sync(core.set_state(cached), core.env)
    if task.engine_options.on_completion:
        drive_sync(core.call_hooks(cached), core.env)
    return run


def refuse_local_only(task: Any, kwargs: Any, options: dict[str, Any]) -> None:
    """``return_state`` and ``wait_for`` shape a local call (``t(..., wait_for=[...])``); a
    message has neither: a ``TypeError`` that says so, before anything is published."""
    for name in RESERVED_PARAMETERS:
        if name in options or (isinstance(kwargs, dict) and name in kwargs):
            fn_name = getattr(task.engine_fn, "__name__", task.name)
            instead = (
                "; to run a task after another in a worker, chain them "
                "(first.s(...) | second.s()) or pass the upstream value itself"
                if name == "wait_for"
                else "; a message's AsyncResult gives the state (.state, get_task_run)"
            )
            raise TypeError(
                f"{fn_name}() got {name!r}, which only a local call takes "
                f"({fn_name}(..., {name}=...)){instead}"
            )
