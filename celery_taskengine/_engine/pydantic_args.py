"""Celery's ``pydantic=True`` on engine tasks: arguments validated into their annotated models,
returned models dumped.

Celery validates inside a wrapper around the function. Here validation belongs to the run,
before its first step, for two reasons: INPUTS cache keys then hash the validated models (so
``{"sku": "a"}`` and ``Item(sku="a")`` share an entry), and an invalid argument fails the run
without a retry (no later attempt could pass). ``.delay()`` validates first, so bad arguments
raise there, and sends models as their JSON dump, which the worker validates back.

As in Celery: a parameter is validated when its annotation (or ``Optional[...]`` of it, for a
value that is not ``None``) is a ``pydantic.BaseModel`` subclass; the context holds
``pydantic_context`` plus ``celery_app`` and ``celery_task_name``; a returned model that is an
instance of the return annotation is dumped with ``{"mode": "json", **pydantic_dump_kwargs}``.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any

__all__ = [
    "PYDANTIC_OPTIONS",
    "PydanticSpec",
    "arguments_for_sending",
    "dump_result",
    "pydantic_spec",
    "validate_parameters",
]

#: The decorator options of Celery's pydantic support (``@app.task(pydantic=True, ...)``).
PYDANTIC_OPTIONS = ("pydantic", "pydantic_strict", "pydantic_context", "pydantic_dump_kwargs")


@dataclass(frozen=True, slots=True)
class PydanticSpec:
    """How a ``pydantic=True`` task validates and dumps (Celery's defaults)."""

    strict: bool = False
    context: Mapping[str, Any] = field(default_factory=dict)
    dump_kwargs: Mapping[str, Any] = field(default_factory=lambda: {"mode": "json"})


def pydantic_spec(given: Mapping[str, Any]) -> PydanticSpec | None:
    """The validated pydantic options, or ``None`` without ``pydantic=True``.

    Raises ``TypeError`` naming the option for a bad value, or for ``pydantic_*`` options
    given without ``pydantic=True`` (Celery ignores them silently).
    """
    enabled = given.get("pydantic", False)
    if not isinstance(enabled, bool):
        raise TypeError(f"task option 'pydantic' must be a bool, got {enabled!r}")
    if not enabled:
        extra = [name for name in PYDANTIC_OPTIONS[1:] if given.get(name) is not None]
        if extra:
            raise TypeError(f"task option {extra[0]!r} needs pydantic=True")
        return None
    strict = given.get("pydantic_strict", False)
    if not isinstance(strict, bool):
        raise TypeError(f"task option 'pydantic_strict' must be a bool, got {strict!r}")
    context = _mapping("pydantic_context", given.get("pydantic_context"))
    dumping = _mapping("pydantic_dump_kwargs", given.get("pydantic_dump_kwargs"))
    dump_kwargs = {"mode": "json", **dumping}
    return PydanticSpec(strict, MappingProxyType(context), MappingProxyType(dump_kwargs))


def _mapping(name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"task option {name!r} must be a dict, got {value!r}")
    return dict(value)


def validate_parameters(task: Any, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """``parameters`` with every model-annotated value validated into its model.

    Raises pydantic's ``ValidationError`` (a ``ValueError``) for a value that does not fit.
    """
    spec: PydanticSpec = task.engine_options.pydantic
    validated = dict(parameters)
    for name, value in parameters.items():
        model = _model_for(task.fn, name, value)
        if model is not None:
            validated[name] = model.model_validate(
                value, strict=spec.strict, context=_context(task, spec)
            )
    return validated


def arguments_for_sending(
    task: Any, args: Any, kwargs: Any, *, dump: bool
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments ``.delay()`` sends: validated now (a ``ValidationError`` raises here),
    models dumped to their JSON form when ``dump`` (any serializer but pickle).

    Arguments that do not fit the signature are returned as given, for Celery's own check.
    """
    args, kwargs = tuple(args or ()), dict(kwargs or {})
    try:
        bound = inspect.signature(task.fn).bind(*args, **kwargs)
    except TypeError:
        return args, kwargs
    spec: PydanticSpec = task.engine_options.pydantic
    for name, value in validate_parameters(task, bound.arguments).items():
        if dump and _model_for(task.fn, name, value) is not None and value is not None:
            bound.arguments[name] = value.model_dump(**spec.dump_kwargs)
    return tuple(bound.args), dict(bound.kwargs)


def dump_result(task: Any, value: Any) -> Any:
    """A returned model dumped, if it is an instance of the return annotation."""
    from pydantic import BaseModel

    if not isinstance(value, BaseModel):
        return value
    annotation = _optional_inner(_hints(task.fn).get("return", inspect.Signature.empty))
    if isinstance(annotation, type) and isinstance(value, annotation):
        spec: PydanticSpec = task.engine_options.pydantic
        return value.model_dump(**spec.dump_kwargs)
    return value


def _context(task: Any, spec: PydanticSpec) -> dict[str, Any]:
    return {**spec.context, "celery_app": getattr(task, "app", None), "celery_task_name": task.name}


def _model_for(fn: Callable[..., Any], name: str, value: Any) -> Any:
    """The model class parameter ``name`` is validated with, or ``None``."""
    from pydantic import BaseModel

    annotation = _hints(fn).get(name)
    if value is not None:
        annotation = _optional_inner(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _optional_inner(annotation: Any) -> Any:
    """``X`` for ``Optional[X]`` / ``X | None``; the annotation itself otherwise."""
    members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if len(members) == 1 and len(typing.get_args(annotation)) == 2:
        return members[0]
    return annotation


@lru_cache(maxsize=1024)
def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """The function's resolved annotations; raw ones where they cannot be resolved (as Celery
    does, for string annotations of names not importable here)."""
    try:
        return typing.get_type_hints(fn)
    except (NameError, AttributeError, TypeError):
        signature = inspect.signature(fn)
        hints = {name: p.annotation for name, p in signature.parameters.items()}
        hints["return"] = signature.return_annotation
        return hints
