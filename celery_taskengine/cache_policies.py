"""Cache policies: how a task run's transaction key is computed.

A policy turns what a run may depend on (its inputs, the task's source, the run id) into a
string key, or ``None`` for "do not cache". Policies are immutable values that combine with
``+`` and drop an argument from the inputs with ``-``. They also carry the isolation and
storage settings that the transaction for the key should use.

This module is pure: no Celery, no storage, no clock. The engine calls one function,
:func:`compute_transaction_key`, which never raises.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from celery_taskengine._engine.cache_hashing import hash_objects, inputs_digest

__all__ = [
    "DEFAULT",
    "INPUTS",
    "NO_CACHE",
    "RUN_ID",
    "TASK_SOURCE",
    "CacheKeyFnPolicy",
    "CachePolicy",
    "CommitMode",
    "CompoundPolicy",
    "Inputs",
    "IsolationLevel",
    "KeyContext",
    "NoCache",
    "RunId",
    "TaskSource",
    "compute_transaction_key",
    "hash_objects",
]

logger = logging.getLogger(__name__)

_P = TypeVar("_P", bound="CachePolicy")


class IsolationLevel(str, enum.Enum):
    """How concurrent runs with the same key see each other.

    ``READ_COMMITTED``: no lock; concurrent identical runs may all execute.
    ``SERIALIZABLE``: a lock per key, so the function runs once and the others read its result.
    """

    READ_COMMITTED = "READ_COMMITTED"
    SERIALIZABLE = "SERIALIZABLE"


class CommitMode(str, enum.Enum):
    """When a transaction writes its staged result.

    ``EAGER``: as soon as it exits, even when nested.
    ``LAZY``: with the root transaction (the default), so a rollback above undoes it.
    ``OFF``: never; the transaction rolls back on exit.
    """

    EAGER = "EAGER"
    LAZY = "LAZY"
    OFF = "OFF"


@dataclass(frozen=True, slots=True)
class KeyContext:
    """Everything a cache key may depend on; also the ``context`` given to a ``cache_key_fn``.

    ``run_id`` is the task run id for a local call and the Celery workflow's root id in a
    worker, so identical calls within one chain, group or chord share a ``RUN_ID`` key.
    ``task_source`` is a callable because reading the source is slow and rarely needed.
    """

    task_name: str
    run_id: str
    task_source: Callable[[], str]
    task_run: Any = None
    extra: Mapping[str, Any] = field(default_factory=dict)


_SETTINGS = (
    ("key_storage", "storage locations"),
    ("isolation_level", "isolation levels"),
    ("lock_manager", "lock implementations"),
)


def _merged_settings(policies: Iterable[CachePolicy]) -> dict[str, Any]:
    """The non-None settings of ``policies``; raises ``ValueError`` if two of them disagree."""
    merged: dict[str, Any] = {}
    for policy in policies:
        for name, plural in _SETTINGS:
            value = getattr(policy, name)
            if value is None:
                continue
            if name in merged and merged[name] != value:
                raise ValueError(f"Cannot add CachePolicies with different {plural}.")
            merged[name] = value
    return merged


@dataclass(frozen=True, slots=True, kw_only=True)
class CachePolicy:
    """Base of all policies: an immutable value that computes a key from a :class:`KeyContext`.

    ``key_storage``, ``lock_manager`` and ``isolation_level`` are not part of the key; they
    tell the engine where the transaction stores its record and how it locks.
    """

    key_storage: Any = None
    lock_manager: Any = None
    isolation_level: IsolationLevel | None = None

    def compute_key(self, ctx: KeyContext, inputs: Mapping[str, Any]) -> str | None:
        """The key for a run with ``inputs``, or ``None`` to run uncached. May raise."""
        raise NotImplementedError

    def configure(
        self: _P,
        *,
        key_storage: Any = None,
        lock_manager: Any = None,
        isolation_level: IsolationLevel | None = None,
    ) -> _P:
        """A copy with the given (non-None) settings replaced; the original is unchanged."""
        given = {
            "key_storage": key_storage,
            "lock_manager": lock_manager,
            "isolation_level": isolation_level,
        }
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})

    def __add__(self, other: CachePolicy) -> CachePolicy:
        if not isinstance(other, CachePolicy):
            return NotImplemented
        if isinstance(other, NoCache):
            return self.configure(**_merged_settings((self, other)))
        if isinstance(self, NoCache):
            return other.configure(**_merged_settings((self, other)))
        return CompoundPolicy((self, other))

    def __sub__(self, name: str) -> CachePolicy:
        """Exclude the argument ``name`` from the key; only :class:`Inputs` is affected."""
        if not isinstance(name, str):
            return NotImplemented
        return self


@dataclass(frozen=True, slots=True)
class Inputs(CachePolicy):
    """Key on the task's inputs, whatever order they were passed in, minus ``exclude``."""

    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A bare string would otherwise be split into its characters.
        names = (self.exclude,) if isinstance(self.exclude, str) else self.exclude
        object.__setattr__(self, "exclude", tuple(dict.fromkeys(names)))

    def compute_key(self, ctx: KeyContext, inputs: Mapping[str, Any]) -> str | None:
        kept = {name: value for name, value in inputs.items() if name not in self.exclude}
        return inputs_digest(kept) if kept else None

    def __sub__(self, name: str) -> CachePolicy:
        if not isinstance(name, str):
            return NotImplemented
        return dataclasses.replace(self, exclude=(*self.exclude, name))


@dataclass(frozen=True, slots=True)
class TaskSource(CachePolicy):
    """Key on the task function's source text, so editing the task invalidates its cache."""

    def compute_key(self, ctx: KeyContext, inputs: Mapping[str, Any]) -> str | None:
        return hash_objects(ctx.task_source())


@dataclass(frozen=True, slots=True)
class RunId(CachePolicy):
    """Key on the run id, so results are shared only within one run (or Celery workflow)."""

    def compute_key(self, ctx: KeyContext, inputs: Mapping[str, Any]) -> str | None:
        return ctx.run_id or None


@dataclass(frozen=True, slots=True)
class NoCache(CachePolicy):
    """Never a key: every run executes. Neutral under ``+``."""

    def compute_key(self, ctx: KeyContext, inputs: Mapping[str, Any]) -> str | None:
        return None


@dataclass(frozen=True, slots=True)
class CacheKeyFnPolicy(CachePolicy):
    """Key computed by the user's ``cache_key_fn(context, parameters)``; ``None`` means no key."""

    fn: Callable[[KeyContext, dict[str, Any]], str | None]

    def compute_key(self, ctx: KeyContext, inputs: Mapping[str, Any]) -> str | None:
        key = self.fn(ctx, dict(inputs))
        if key is not None and not isinstance(key, str):
            raise TypeError(f"cache_key_fn must return a str or None, got {type(key).__name__}")
        return key or None


@dataclass(frozen=True, slots=True)
class CompoundPolicy(CachePolicy):
    """Several policies whose keys are hashed together, in order.

    On construction nested compounds are flattened, ``NoCache`` members dropped, and all
    :class:`Inputs` merged into one (the union of their excludes) placed last. Settings left
    unset on the compound are taken from its members; members that disagree raise
    ``ValueError``.
    """

    policies: tuple[CachePolicy, ...] = ()

    def __post_init__(self) -> None:
        given = tuple(self.policies)
        for name, value in _merged_settings(given).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        others: list[CachePolicy] = []
        excludes: list[str] = []
        has_inputs = False
        for policy in _flatten(given):
            if isinstance(policy, Inputs):
                has_inputs = True
                excludes.extend(policy.exclude)
            elif not isinstance(policy, NoCache):
                others.append(policy)
        if has_inputs:
            others.append(Inputs(exclude=tuple(excludes)))
        object.__setattr__(self, "policies", tuple(others))

    def compute_key(self, ctx: KeyContext, inputs: Mapping[str, Any]) -> str | None:
        keys = [policy.compute_key(ctx, inputs) for policy in self.policies]
        present = [key for key in keys if key is not None]
        return hash_objects(*present) if present else None

    def __sub__(self, name: str) -> CachePolicy:
        if not isinstance(name, str):
            return NotImplemented
        return dataclasses.replace(self, policies=tuple(p - name for p in self.policies))


def _flatten(policies: Iterable[CachePolicy]) -> Iterable[CachePolicy]:
    for policy in policies:
        if isinstance(policy, CompoundPolicy):
            yield from _flatten(policy.policies)
        else:
            yield policy


def keys_from_inputs_only(policy: CachePolicy) -> bool:
    """Whether ``policy``'s keys depend on nothing but the task and its inputs, so they can be
    computed before the run starts: only the built-in policies (a ``cache_key_fn`` or a policy
    of your own may look at the run)."""
    members = policy.policies if isinstance(policy, CompoundPolicy) else (policy,)  # flat
    return all(type(member) in _KEYED_BY_INPUTS for member in members)


_KEYED_BY_INPUTS = frozenset({Inputs, TaskSource, RunId, NoCache})

INPUTS = Inputs()
TASK_SOURCE = TaskSource()
RUN_ID = RunId()
NO_CACHE = NoCache()
DEFAULT = INPUTS + TASK_SOURCE + RUN_ID


def compute_transaction_key(
    policy: CachePolicy | None,
    ctx: KeyContext,
    inputs: Mapping[str, Any],
    *,
    result_storage_key: str | None = None,
) -> str | None:
    """The transaction key for one run, or ``None`` to run uncached. Never raises.

    Keys from a policy are scoped by task name (``"<task_name>/<digest>"``) so two tasks with
    equal inputs do not share entries. Explicit keys, from a ``cache_key_fn`` or a
    ``result_storage_key`` template (which may use ``{parameters[...]}``, ``{task_name}``,
    ``{run_id}`` and ``{task_run}``), are used as given. If the key cannot be computed, a
    warning is logged and the run goes ahead without caching.
    """
    try:
        if isinstance(policy, CacheKeyFnPolicy):
            return policy.compute_key(ctx, inputs)
        if policy is not None:
            key = policy.compute_key(ctx, inputs)
            return f"{ctx.task_name}/{key}" if key is not None else None
        if result_storage_key is not None:
            return _storage_key(result_storage_key, ctx, inputs)
        return None
    except Exception as exc:
        # In a worker ctx.run_id is the workflow's root id; the task run's own id is more useful.
        logger.warning(
            "%s: cannot compute the cache key of task %r, so its result will not be cached "
            "(%s: %s)",
            getattr(ctx.task_run, "id", None) or ctx.run_id,
            ctx.task_name,
            type(exc).__name__,
            exc,
        )
        return None


def _storage_key(template: str, ctx: KeyContext, inputs: Mapping[str, Any]) -> str | None:
    variables = {
        **ctx.extra,
        "parameters": dict(inputs),
        "task_name": ctx.task_name,
        "run_id": ctx.run_id,
        "task_run": ctx.task_run,
    }
    return template.format(**variables) or None
