"""Checks at decoration of what options refer to: the function's parameters, a callable's
signature, a serializer kombu knows. Each of these mistakes would otherwise surface only when
a run or a message meets it (a bare ``KeyError`` when the run is named, a retry condition that
"raised; not retrying" in the log, kombu's ``SerializerNotInstalled`` at ``.delay()``), far
from the decorator that holds it."""

from __future__ import annotations

import inspect
import string
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["check_references"]


def check_references(fn: Callable[..., Any], given: Mapping[str, Any]) -> None:
    """Raise ``TypeError``/``ValueError`` naming the option whose value cannot work for ``fn``."""
    name = given.get("task_run_name")
    if isinstance(name, str):
        _check_template(fn, name)
    condition = given.get("retry_condition_fn")
    if callable(condition):
        _check_arity("retry_condition_fn", condition, 3, "(task, task_run, state)")
    serializer = given.get("serializer")
    if serializer is not None:
        _check_serializer(serializer)


def _check_template(fn: Callable[..., Any], template: str) -> None:
    """Every ``{field}`` of a run-name template must be one of ``fn``'s parameters."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field]
    except ValueError as exc:
        raise ValueError(f"task option 'task_run_name': bad template {template!r}: {exc}") from exc
    parameters = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return  # any name may come in **kwargs
    for field in fields:
        root = field.split(".", 1)[0].split("[", 1)[0]
        if root not in parameters:
            known = ", ".join(parameters) or "none"
            raise ValueError(
                f"task option 'task_run_name': {{{field}}} in {template!r} is not a parameter "
                f"of {getattr(fn, '__name__', fn)!r} (its parameters: {known})"
            )


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
    """Celery's ``serializer`` option: a name kombu can encode with."""
    from kombu.serialization import registry  # kombu's, at call time: plugins register late

    if not isinstance(value, str) or value not in registry._encoders:
        known = ", ".join(sorted(registry._encoders))
        raise ValueError(f"task option 'serializer': unknown serializer {value!r} (known: {known})")
