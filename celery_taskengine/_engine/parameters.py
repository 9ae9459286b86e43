"""Turning call arguments into a run's parameters and back.

Parameters are a dict by name with defaults applied (``f(1)`` for ``def f(a, b=2)`` gives
``{"a": 1, "b": 2}``), which is what cache keys, run names and run records use.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

__all__ = ["bind_parameters", "call_arguments"]


_EMPTY = inspect.Parameter.empty


@lru_cache(maxsize=4096)
def _layout(fn: Callable[..., Any]) -> tuple[inspect.Signature, tuple[tuple[str, Any], ...] | None]:
    """The signature and, when zip-binding is enough (no *args, **kwargs or keyword-only
    parameters), each parameter's name and default."""
    signature = inspect.signature(fn)
    parameters = signature.parameters.values()
    if all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters):
        return signature, tuple((p.name, p.default) for p in parameters)
    return signature, None


def bind_parameters(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """Bind ``args``/``kwargs`` to ``fn``'s parameters with defaults applied.

    Raises ``TypeError`` naming the problem when the arguments don't fit the signature.
    """
    signature, simple = _layout(fn)
    if simple is not None and len(args) <= len(simple):
        bound: dict[str, Any] = {}
        for index, (name, default) in enumerate(simple):
            if index < len(args):
                if name in kwargs:
                    break
                bound[name] = args[index]
            elif name in kwargs:
                bound[name] = kwargs[name]
            elif default is not _EMPTY:
                bound[name] = default
            else:
                break
        else:
            if all(k in bound for k in kwargs):  # else an unknown keyword: bind() names it
                return bound
    try:
        arguments = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{getattr(fn, '__qualname__', fn)}(): {exc}") from None
    arguments.apply_defaults()
    return dict(arguments.arguments)


def call_arguments(
    fn: Callable[..., Any], parameters: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The ``(args, kwargs)`` that call ``fn`` with ``parameters``."""
    signature, simple = _layout(fn)
    if simple is not None:
        return (), dict(parameters)
    bound = inspect.BoundArguments(signature, dict(parameters))
    return bound.args, bound.kwargs
