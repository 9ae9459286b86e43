"""Task options: validated once, at decoration time, into one frozen object.

Bad values raise ``TypeError``/``ValueError`` naming the option, so mistakes surface when the
module is imported rather than at 3 a.m. in a worker. Times are normalised to seconds here.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from celery_taskengine import cache_policies as cp
from celery_taskengine._celery.celery_retries import (
    CELERY_RETRY_OPTIONS,
    self_retry_limit,
    translate,
    without_overridden,
)
from celery_taskengine._engine.pydantic_args import PYDANTIC_OPTIONS, PydanticSpec, pydantic_spec
from celery_taskengine._engine.retry_policy import MAX_RETRY_DELAYS
from celery_taskengine.errors import ReservedArgumentError

__all__ = ["RESERVED_PARAMETERS", "TaskOptions", "build_options", "split_celery_options"]

logger = logging.getLogger(__name__)

#: Parameter names the engine takes for itself in ``t(...)``.
RESERVED_PARAMETERS = ("return_state", "wait_for")

HOOK_OPTIONS = ("on_running", "on_completion", "on_failure", "on_commit", "on_rollback")

ENGINE_OPTIONS = frozenset(
    {
        "name",
        "description",
        "version",
        "tags",
        "retries",
        "retry_delay_seconds",
        "retry_jitter_factor",
        "retry_condition_fn",
        "timeout_seconds",
        "cache_policy",
        "cache_key_fn",
        "cache_expiration",
        "refresh_cache",
        "persist_result",
        "result_storage_key",
        "result_serializer",
        "task_run_name",
        "log_prints",
        *HOOK_OPTIONS,
        *PYDANTIC_OPTIONS,
    }
)

#: Celery decorator options that are not Task attributes but that Celery understands.
_CELERY_DECORATOR_ONLY = frozenset({"queue", "exchange", "routing_key", "shared", "lazy"})
#: Celery options that would fight the engine; the message says what to use instead.
_CONFLICTING = {
    "bind": "give bind= to the decorator (@task(bind=True)); a copy cannot change it",
    "base": "engine tasks are built on celery_taskengine.Task",
}

HookList = tuple[Callable[..., Any], ...]

_NONE_MEANS_NO_LIMIT = frozenset({"timeout_seconds", "cache_expiration"})


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """Everything the engine needs to know about a task, normalised (seconds, tuples)."""

    name: str
    description: str | None = None
    version: str | None = None
    tags: frozenset[str] = frozenset()
    retries: int = 0
    retry_delays: tuple[float, ...] = ()
    retry_jitter_factor: float | None = None
    #: Celery's ``retry_jitter``: each delay drawn evenly from ``[0, delay]`` (whole seconds).
    retry_full_jitter: bool = False
    retry_condition_fn: Callable[..., Any] | None = None
    timeout_seconds: float | None = None
    cache_policy: cp.CachePolicy | None = None
    cache_expiration: float | None = None
    refresh_cache: bool = False
    persist_result: bool = False
    result_storage_key: str | None = None
    result_serializer: str = "json"
    task_run_name: str | Callable[..., Any] | None = None
    log_prints: bool = False
    on_running: HookList = ()
    on_completion: HookList = ()
    on_failure: HookList = ()
    on_commit: HookList = ()
    on_rollback: HookList = ()
    pydantic: PydanticSpec | None = None
    given: Mapping[str, Any] = field(default_factory=dict)

    @property
    def retry_limit(self) -> int:
        """How many retries ``self.retry()`` may ask for (see celery_retries)."""
        return self_retry_limit(self.given, self.retries)

    @property
    def uses_transaction(self) -> bool:
        """Whether a run needs a transaction at all (the fast path skips it)."""
        isolation = self.cache_policy.isolation_level if self.cache_policy else None
        return bool(
            self.persist_result
            or self.on_commit
            or self.on_rollback
            or isolation is cp.IsolationLevel.SERIALIZABLE
        )

    def with_changes(self, fn: Callable[..., Any], **changes: Any) -> TaskOptions:
        """A copy rebuilt from the originally given options updated with ``changes``."""
        merged = {**without_overridden(self.given, changes), **changes}
        merged.setdefault("name", self.name)
        return build_options(fn, merged)


def split_celery_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate engine options from Celery task options; reject unknown or conflicting ones."""
    from celery.app.task import Task as CeleryTask  # at call time: the core imports options

    engine: dict[str, Any] = {}
    celery: dict[str, Any] = {}
    for key, value in options.items():
        if key in ENGINE_OPTIONS or key in CELERY_RETRY_OPTIONS:
            engine[key] = value  # Celery's retry options are translated by build_options
        elif key in _CONFLICTING:
            raise TypeError(f"task option {key!r} is not supported: {_CONFLICTING[key]}")
        elif key in _CELERY_DECORATOR_ONLY or (
            hasattr(CeleryTask, key) and not key.startswith("_")
        ):
            celery[key] = value
        else:
            raise TypeError(
                f"unknown task option {key!r}: not an engine option and not a Celery task "
                f"option{_did_you_mean(key)}"
            )
    return engine, celery


def _did_you_mean(key: str) -> str:
    from celery.app.task import Task as CeleryTask

    celery_settings = {
        name
        for name in dir(CeleryTask)
        # getattr_static: a plain getattr would fire Celery's deprecation warnings.
        if not name.startswith("_") and not callable(inspect.getattr_static(CeleryTask, name))
    }
    known = ENGINE_OPTIONS | _CELERY_DECORATOR_ONLY | celery_settings
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build_options(fn: Callable[..., Any], given: Mapping[str, Any]) -> TaskOptions:
    """Validate the engine options given for ``fn`` into a :class:`TaskOptions`.

    Celery's retry options among them are translated first (see celery_retries).
    """
    _check_reserved_parameters(fn)
    original, celery_retries = given, translate(given)
    given = celery_retries.options
    retries = _retries(given.get("retries"))
    policy, persist = _resolve_caching(given)
    return TaskOptions(
        name=_name(given.get("name"), fn),
        description=given.get("description") or inspect.getdoc(fn),
        version=given.get("version"),
        tags=_tags(given.get("tags")),
        retries=retries,
        retry_delays=_retry_delays(given.get("retry_delay_seconds"), retries),
        retry_jitter_factor=_jitter(given.get("retry_jitter_factor")),
        retry_full_jitter=celery_retries.full_jitter,
        retry_condition_fn=_optional_callable("retry_condition_fn", given),
        timeout_seconds=_seconds("timeout_seconds", given.get("timeout_seconds"), falsy_none=True),
        cache_policy=policy,
        cache_expiration=_seconds("cache_expiration", given.get("cache_expiration")),
        refresh_cache=_flag("refresh_cache", given.get("refresh_cache")),
        persist_result=persist,
        result_storage_key=_optional_str("result_storage_key", given),
        result_serializer=_serializer(given.get("result_serializer")),
        task_run_name=_task_run_name(given.get("task_run_name")),
        log_prints=_flag("log_prints", given.get("log_prints")),
        **{hook: _hooks(hook, given.get(hook)) for hook in HOOK_OPTIONS},
        pydantic=pydantic_spec(given),
        given=dict(original),
    )


def _check_reserved_parameters(fn: Callable[..., Any]) -> None:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    for reserved in RESERVED_PARAMETERS:
        if reserved in parameters:
            raise ReservedArgumentError(
                f"{reserved!r} is a reserved argument name and cannot be used "
                f"(task function {getattr(fn, '__qualname__', fn)!r})."
            )


def _name(value: Any, fn: Callable[..., Any]) -> str:
    if value is None:
        return str(getattr(fn, "__name__", type(fn).__name__))
    if not isinstance(value, str) or not value:
        raise TypeError(f"task option 'name' must be a non-empty str, got {value!r}")
    return value


def _tags(value: Any) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(f"task option 'tags' must be a list of str, got {value!r}")
    tags = list(value)
    if not all(isinstance(tag, str) for tag in tags):
        raise TypeError(f"task option 'tags' must contain only str, got {tags!r}")
    return frozenset(tags)


def _retries(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"task option 'retries' must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"task option 'retries' must be >= 0, got {value}")
    return value


def _retry_delays(value: Any, retries: int) -> tuple[float, ...]:
    if value is None:
        return ()
    if callable(value):
        try:
            value = value(retries)
        except Exception as exc:
            raise ValueError(
                f"task option 'retry_delay_seconds': the callable raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(value, list | tuple):
            raise TypeError(
                "task option 'retry_delay_seconds': the callable must return a list of seconds, "
                f"got {value!r}"
            )
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list | tuple):
        raise TypeError(
            "task option 'retry_delay_seconds' must be a number, a list of numbers or a "
            f"callable, got {type(value).__name__}"
        )
    if len(value) > MAX_RETRY_DELAYS:
        raise ValueError(
            f"task option 'retry_delay_seconds' can hold at most {MAX_RETRY_DELAYS} delays, "
            f"got {len(value)}"
        )
    return tuple(_seconds("retry_delay_seconds", item) or 0.0 for item in value)


def _jitter(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"task option 'retry_jitter_factor' must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"task option 'retry_jitter_factor' must be finite, got {value}")
    if value < 0:
        raise ValueError(f"task option 'retry_jitter_factor' must be >= 0, got {value}")
    return float(value)


def _seconds(option: str, value: Any, *, falsy_none: bool = False) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"task option {option!r} must be seconds or a timedelta, got {value!r}")
    if not math.isfinite(value):
        # NaN and infinity pass every comparison check and then fail deep in a run (timers,
        # timedelta); "no limit" is spelled None.
        hint = " (use None for no limit)" if option in _NONE_MEANS_NO_LIMIT else ""
        raise ValueError(
            f"task option {option!r} must be a finite number of seconds, got {value}{hint}"
        )
    if falsy_none and not value:
        return None
    if option != "cache_expiration" and value < 0:
        raise ValueError(f"task option {option!r} must be >= 0 seconds, got {value}")
    return float(value)


def _flag(option: str, value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise TypeError(f"task option {option!r} must be True or False, got {value!r}")
    return value


def _optional_callable(option: str, given: Mapping[str, Any]) -> Callable[..., Any] | None:
    value = given.get(option)
    if value is not None and not callable(value):
        raise TypeError(f"task option {option!r} must be callable, got {type(value).__name__}")
    return value


def _optional_str(option: str, given: Mapping[str, Any]) -> str | None:
    value = given.get(option)
    if value is not None and not isinstance(value, str):
        raise TypeError(f"task option {option!r} must be a str template, got {value!r}")
    return value


def _serializer(value: Any) -> str:
    if value is None:
        return "json"
    if not isinstance(value, str):
        raise TypeError(f"task option 'result_serializer' must be a str, got {value!r}")
    from kombu.serialization import registry as serializer_registry  # kombu's, at call time

    if value not in serializer_registry._encoders:
        known = ", ".join(sorted(serializer_registry._encoders))
        raise ValueError(
            f"task option 'result_serializer': unknown serializer {value!r} (known: {known})"
        )
    return value


def _task_run_name(value: Any) -> str | Callable[..., Any] | None:
    if value is None or isinstance(value, str) or callable(value):
        return value  # type: ignore[no-any-return]
    raise TypeError(
        f"task option 'task_run_name' must be a str template or a callable, "
        f"got {type(value).__name__}"
    )


def _hooks(option: str, value: Any) -> HookList:
    if value is None:
        return ()
    if callable(value) or not isinstance(value, Iterable) or isinstance(value, str):
        raise TypeError(
            f"task option {option!r} must be a list of hooks, e.g. {option}=[my_hook]; "
            f"got {type(value).__name__}"
        )
    hooks = tuple(value)
    for hook in hooks:
        if not callable(hook):
            raise TypeError(
                f"task option {option!r} must contain callables, got {type(hook).__name__}"
            )
    return hooks


def _resolve_caching(given: Mapping[str, Any]) -> tuple[cp.CachePolicy | None, bool]:
    """The policy and persistence a task really uses (Prefect's rules, applied once)."""
    policy = given.get("cache_policy")
    if policy is not None and not isinstance(policy, cp.CachePolicy):
        raise TypeError(
            f"task option 'cache_policy' must be a CachePolicy (e.g. INPUTS), got {policy!r}"
        )
    key_fn = _optional_callable("cache_key_fn", given)
    storage_key = given.get("result_storage_key")
    persist = given.get("persist_result")
    if persist is not None and not isinstance(persist, bool):
        raise TypeError(f"task option 'persist_result' must be True or False, got {persist!r}")
    if key_fn is not None:
        if policy is not None:
            logger.warning("Both cache_policy and cache_key_fn are set; cache_key_fn is used.")
        policy = cp.CacheKeyFnPolicy(key_fn)
    explicit_policy = policy is not None and not isinstance(policy, cp.NoCache)
    if persist is None and (
        explicit_policy or storage_key is not None or given.get("result_serializer") is not None
    ):
        persist = True
    if persist is False:
        if explicit_policy:
            logger.warning("Ignoring cache_policy because persist_result is False.")
        return cp.NO_CACHE, False
    if storage_key is not None and not isinstance(policy, cp.NoCache):
        return None, bool(persist)
    return (policy if policy is not None else cp.DEFAULT), bool(persist)
