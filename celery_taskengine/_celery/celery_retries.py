"""Celery's retry options, translated into engine retries with Celery 5.7's meaning.

A task moved from ``@app.task`` keeps ``autoretry_for``, ``retry_backoff``, ``max_retries``
and friends: they become ``retries``, ``retry_delay_seconds`` and a retry condition here, at
decoration time, so the engine (not a Celery-level ``retry()`` behind its back) runs every
retry. The delays are Celery's: ``min(retry_backoff_max, factor * 2**n)`` seconds before retry
``n + 1``, each drawn evenly from ``[0, delay]`` when ``retry_jitter`` is on (see
``celery.app.autoretry`` and ``celery.utils.time.get_exponential_backoff_interval``).

A Celery option given together with its engine counterpart must agree: ``retries=4,
max_retries=1`` is a ``TypeError`` naming both, never a silent winner.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from celery_taskengine._engine.retry_policy import MAX_RETRY_DELAYS
from celery_taskengine.states import State

__all__ = [
    "CELERY_RETRY_OPTIONS",
    "ONLY_SELF_RETRY",
    "AutoRetryCondition",
    "CeleryRetries",
    "translate",
]

#: Celery task options about retries, and the engine option each one stands for.
COUNTERPARTS: dict[str, tuple[str, ...]] = {
    "max_retries": ("retries",),
    "retry_kwargs": ("retries", "retry_delay_seconds"),
    "default_retry_delay": ("retry_delay_seconds",),
    "retry_backoff": ("retry_delay_seconds",),
    "retry_backoff_max": ("retry_delay_seconds",),
    "retry_jitter": ("retry_jitter_factor",),
    "autoretry_for": ("retry_condition_fn",),
    "dont_autoretry_for": ("retry_condition_fn",),
}
CELERY_RETRY_OPTIONS = frozenset(COUNTERPARTS)

#: Celery's own defaults (``celery.app.task.Task`` and ``celery.app.autoretry``).
CELERY_MAX_RETRIES = 3
CELERY_RETRY_DELAY = 180.0
CELERY_BACKOFF_MAX = 600


@dataclass(frozen=True, slots=True)
class CeleryRetries:
    """The engine options Celery's retry options came to, and whether delays get full jitter."""

    options: dict[str, Any]
    full_jitter: bool = False


@dataclass(frozen=True, slots=True)
class AutoRetryCondition:
    """``retry_condition_fn`` for ``autoretry_for``/``dont_autoretry_for``: retry only an
    exception of the first kind that is not of the second, as Celery's autoretry does."""

    autoretry_for: tuple[type[BaseException], ...] | None
    dont_autoretry_for: tuple[type[BaseException], ...] = ()

    def __call__(self, task: Any, task_run: Any, state: State) -> bool:
        exc = state.data
        if not isinstance(exc, BaseException):
            return self.autoretry_for is None  # a returned failed state: no exception to match
        if isinstance(exc, self.dont_autoretry_for):
            return False
        return self.autoretry_for is None or isinstance(exc, self.autoretry_for)


#: The retry condition of a task whose retries are Celery's ``max_retries`` alone: no exception
#: is retried by itself; ``self.retry()`` always is (it bypasses the condition).
ONLY_SELF_RETRY = AutoRetryCondition(autoretry_for=())


def translate(given: Mapping[str, Any]) -> CeleryRetries:
    """Engine options equivalent to ``given``, with its Celery retry options replaced.

    Raises ``TypeError``/``ValueError`` naming the option for a bad value, and ``TypeError``
    naming both when a Celery option and its engine counterpart disagree.
    """
    celery = {key: given[key] for key in CELERY_RETRY_OPTIONS if key in given}
    if not celery:
        return CeleryRetries(dict(given))
    engine = {key: value for key, value in given.items() if key not in CELERY_RETRY_OPTIONS}
    retry_kwargs = _retry_kwargs(celery.get("retry_kwargs"))
    count, count_from = _retry_count(celery, retry_kwargs)
    _agree(engine, "retries", count, count_from)
    retries = engine.get("retries")
    if not isinstance(retries, int) or isinstance(retries, bool):
        retries = 0  # a bad value is reported by the engine's own check
    delays, delays_from = _delays(celery, retry_kwargs, retries)
    _agree(engine, "retry_delay_seconds", delays, delays_from, same=_same_delays)
    full = _full_jitter(celery)
    if full and engine.get("retry_jitter_factor"):
        raise TypeError(
            "task options 'retry_jitter' and 'retry_jitter_factor' disagree: Celery's full "
            "jitter and the engine's jitter factor cannot both apply; give one of them"
        )
    condition = _condition(celery)
    if condition is not None:
        _agree(engine, "retry_condition_fn", condition, _condition_from(celery))
    elif count_from and "retries" not in given and engine.get("retry_condition_fn") is None:
        # Celery's count without autoretry_for: only ``self.retry()`` retries, as in Celery
        # (the engine's own ``retries`` retries every exception).
        engine["retry_condition_fn"] = ONLY_SELF_RETRY
    return CeleryRetries(engine, full_jitter=full)


def without_overridden(given: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` without the Celery options whose engine counterpart ``changes`` sets anew
    (``t.with_options(retries=5)`` on a ``max_retries=3`` task means 5, not a conflict)."""
    return {
        key: value
        for key, value in given.items()
        if not any(engine in changes for engine in COUNTERPARTS.get(key, ()))
    }


def _agree(
    engine: dict[str, Any],
    key: str,
    value: Any,
    celery_name: str,
    *,
    same: Callable[[Any, Any], bool] = lambda a, b: bool(a == b),
) -> None:
    if value is None:
        return
    if key in engine and engine[key] is not None and not same(engine[key], value):
        raise TypeError(
            f"task options {celery_name!r} and {key!r} disagree ({celery_name} means "
            f"{key}={value!r}, but {key}={engine[key]!r} was given): give one of them"
        )
    engine[key] = value


def _retry_kwargs(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"task option 'retry_kwargs' must be a dict, got {value!r}")
    unknown = sorted(set(value) - {"max_retries", "countdown"})
    if unknown:
        raise TypeError(
            f"task option 'retry_kwargs': {', '.join(map(repr, unknown))} not supported on an "
            "engine task (only 'max_retries' and 'countdown': a retry keeps its arguments "
            "and routing)"
        )
    return dict(value)


def _retry_count(celery: Mapping[str, Any], retry_kwargs: Mapping[str, Any]) -> tuple[Any, str]:
    """The number of retries Celery's options mean (``None``: they say nothing)."""
    count = _max_retries("max_retries", celery.get("max_retries", None), "max_retries" in celery)
    in_kwargs = _max_retries(
        "retry_kwargs", retry_kwargs.get("max_retries"), "max_retries" in retry_kwargs
    )
    if count is not None and in_kwargs is not None and count != in_kwargs:
        raise TypeError(
            f"task options 'max_retries' ({count}) and 'retry_kwargs' (max_retries="
            f"{in_kwargs}) disagree: give one of them"
        )
    if count is not None:
        return count, "max_retries"
    if in_kwargs is not None:
        return in_kwargs, "retry_kwargs"
    if celery.get("autoretry_for"):
        return CELERY_MAX_RETRIES, "autoretry_for"  # Celery's default max_retries
    return None, ""


def _max_retries(option: str, value: Any, given: bool) -> int | None:
    if not given:
        return None
    if value is None:
        raise TypeError(
            f"task option {option!r}: max_retries=None (retry for ever) is not supported on "
            "an engine task; give a number of retries"
        )
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"task option {option!r}: max_retries must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"task option {option!r}: max_retries must be >= 0, got {value}")
    return value


def _delays(
    celery: Mapping[str, Any], retry_kwargs: Mapping[str, Any], retries: int
) -> tuple[list[float] | None, str]:
    """The delay before each retry, as Celery would wait it (``None``: nothing said)."""
    backoff = _number("retry_backoff", celery.get("retry_backoff", False))
    if backoff:
        factor = int(max(1.0, backoff))
        maximum = int(_number("retry_backoff_max", celery.get("retry_backoff_max")) or 0)
        if "retry_backoff_max" not in celery:
            maximum = CELERY_BACKOFF_MAX
        count = max(1, min(retries, MAX_RETRY_DELAYS))
        return [float(max(0, min(maximum, factor * 2**n))) for n in range(count)], "retry_backoff"
    if "countdown" in retry_kwargs:
        return [_seconds("retry_kwargs", retry_kwargs["countdown"])], "retry_kwargs"
    if "default_retry_delay" in celery:
        delay = _seconds("default_retry_delay", celery["default_retry_delay"])
        return [delay], "default_retry_delay"
    if celery.get("autoretry_for"):
        return [CELERY_RETRY_DELAY], "autoretry_for"
    return None, ""


def _full_jitter(celery: Mapping[str, Any]) -> bool:
    jitter = celery.get("retry_jitter", True)
    if not isinstance(jitter, bool):
        raise TypeError(f"task option 'retry_jitter' must be True or False, got {jitter!r}")
    # As in Celery, jitter applies to backoff delays only.
    return jitter and bool(_number("retry_backoff", celery.get("retry_backoff", False)))


def _condition(celery: Mapping[str, Any]) -> AutoRetryCondition | None:
    if "autoretry_for" not in celery and "dont_autoretry_for" not in celery:
        return None
    autoretry = _exception_types("autoretry_for", celery.get("autoretry_for"))
    dont = _exception_types("dont_autoretry_for", celery.get("dont_autoretry_for")) or ()
    return AutoRetryCondition(autoretry, dont)


def _condition_from(celery: Mapping[str, Any]) -> str:
    return "autoretry_for" if "autoretry_for" in celery else "dont_autoretry_for"


def _exception_types(option: str, value: Any) -> tuple[type[BaseException], ...] | None:
    if value is None:
        return None
    if isinstance(value, type) or not isinstance(value, list | tuple | set | frozenset):
        raise TypeError(
            f"task option {option!r} must be a tuple of exception classes, got {value!r}"
        )
    types = tuple(value)
    for item in types:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise TypeError(f"task option {option!r} must hold exception classes, got {item!r}")
    return types


def _number(option: str, value: Any) -> float:
    if value is None:
        return 0.0
    if not isinstance(value, int | float):
        raise TypeError(f"task option {option!r} must be a number or a bool, got {value!r}")
    return float(value)


def _seconds(option: str, value: Any) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise TypeError(f"task option {option!r}: a delay must be seconds >= 0, got {value!r}")
    return float(value)


def _same_delays(given: Any, translated: list[float]) -> bool:
    if isinstance(given, timedelta):
        given = given.total_seconds()
    if isinstance(given, int | float) and not isinstance(given, bool):
        given = [given]
    if not isinstance(given, list | tuple):
        return False  # a callable: cannot be compared, so it cannot be said to agree
    try:
        return [float(item) for item in given] == translated
    except (TypeError, ValueError):
        return False
