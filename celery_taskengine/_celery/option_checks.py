"""Checks at decoration of what options refer to: a callable's signature, a serializer kombu
knows (a warning: it may be registered later). Each mistake would otherwise surface only when
a run or a message meets it (a retry condition that "raised; not retrying" in the log, kombu's
``SerializerNotInstalled`` at ``.delay()``), far from the decorator that holds it. A run-name
template's fields are not checked: as in Prefect, a missing one is a ``KeyError`` when the run
is named, before Running."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["check_references"]

logger = logging.getLogger(__name__)


def check_references(fn: Callable[..., Any], given: Mapping[str, Any]) -> None:
    """Raise ``TypeError``/``ValueError`` naming the option whose value cannot work for ``fn``."""
    condition = given.get("retry_condition_fn")
    if callable(condition):
        _check_arity("retry_condition_fn", condition, 3, "(task, task_run, state)")
    serializer = given.get("serializer")
    if serializer is not None:
        _check_serializer(serializer)


def _check_arity(option: str, fn: Callable[..., Any], count: int, shape: str) -> None:
    """``fn`` must accept ``count`` positional arguments, as the engine calls it."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C callable without a signature: taken on trust
    try:
        signature.bind(*([None] * count))
    except TypeError as exc:
        raise TypeError(
            f"task option {option!r}: {getattr(fn, '__name__', fn)!r} must take {shape}: {exc}"
        ) from None


def _check_serializer(value: Any) -> None:
    """Celery's ``serializer`` option: a name kombu can encode with. Not a str is an error; a
    name kombu does not know yet is a warning, since one may be registered later (Celery's
    ``auth`` by ``app.setup_security()``, a plugin of the user's)."""
    from kombu.serialization import registry  # kombu's, at call time: plugins register late

    if not isinstance(value, str):
        raise TypeError(f"task option 'serializer' must be a str, got {value!r}")
    if value not in registry._encoders:
        known = ", ".join(sorted(registry._encoders))
        logger.warning(
            "task option 'serializer': no serializer %r is registered (known now: %s); "
            ".delay() fails unless it is registered before",
            value,
            known,
        )
