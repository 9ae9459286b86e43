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
import datetime
import decimal
import enum
import hashlib
import json
import logging
import pickle
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, TypeVar

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

# Pinned so that a key computed by one Python version matches the one computed by another.
_PICKLE_PROTOCOL = 4


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


def _json_default(obj: Any) -> Any:
    """Give JSON a stable, tagged form for common values it cannot encode by itself.

    Sets are sorted by their encoded members, because pickling them would depend on the
    process's hash seed and give a different key in every worker.
    """
    tag = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if isinstance(obj, (set, frozenset)):
        return {"__type__": tag, "items": sorted(_canonical_json(item) for item in obj)}
    if isinstance(obj, (bytes, bytearray)):
        return {"__type__": tag, "hex": bytes(obj).hex()}
    if isinstance(obj, (datetime.date, datetime.time)):
        return {"__type__": tag, "iso": obj.isoformat()}
    if isinstance(obj, (datetime.timedelta, decimal.Decimal, uuid.UUID, PurePath)):
        return {"__type__": tag, "str": str(obj)}
    if isinstance(obj, enum.Enum):
        return {"__type__": tag, "name": obj.name}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return {"__type__": tag, "fields": values}
    dump = getattr(obj, "model_dump", None)  # pydantic v2 models, without importing pydantic
    if callable(dump):
        return {"__type__": tag, "fields": dump(mode="json")}
    raise TypeError(f"{type(obj).__qualname__} is not JSON serializable")


# Built once: json.dumps with options builds a new encoder per call, a third of a key's cost.
_CANONICAL_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=_json_default)


def _canonical_json(obj: Any) -> str:
    return _CANONICAL_ENCODER.encode(obj)


def hash_objects(*objects: Any) -> str:
    """A stable hex digest of ``objects``, the same in every process and on every machine.

    The objects are encoded as canonical JSON (dict keys sorted, so insertion order does not
    matter); values JSON cannot encode fall back to pickle. Raises ``ValueError`` when
    neither works, with a message saying how to leave the value out of the key.
    """
    try:
        payload = _canonical_json(objects).encode()
    except (TypeError, ValueError):
        try:
            payload = pickle.dumps(objects, protocol=_PICKLE_PROTOCOL)
        except Exception as exc:
            raise ValueError(
                f"cannot hash a value for the cache key ({type(exc).__name__}: {exc}). "
                "Task inputs that are neither JSON- nor pickle-serializable (locks, open "
                "files, clients, ...) cannot be part of a key. Exclude the argument with "
                '`cache_policy=INPUTS - "name"`, compute the key yourself with '
                "`cache_key_fn=...`, or turn caching off with `cache_policy=NO_CACHE`."
            ) from exc
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


#: Digests of inputs that are all short strings, ints, bools or None, by their names, types
#: and values: a cached task is called with the same few such inputs again and again, and
#: hashing them was most of a key's cost. Floats are left out: ``0.0 == -0.0``, but their JSON
#: differs. Cleared when full.
_DIGESTS: dict[tuple[tuple[str, type, Any], ...], str] = {}
_DIGESTS_MAX = 1024
_MEMO_TYPES = frozenset({str, int, bool, type(None)})
_MEMO_MAX_CHARS = 256


def _inputs_digest(inputs: dict[str, Any]) -> str:
    """``hash_objects(inputs)``, remembered for inputs of plain scalars."""
    memo = tuple([(name, type(value), value) for name, value in inputs.items()])
    for _, kind, value in memo:
        if kind not in _MEMO_TYPES or (kind is str and len(value) > _MEMO_MAX_CHARS):
            return hash_objects(inputs)
    digest = _DIGESTS.get(memo)
    if digest is None:
        digest = hash_objects(inputs)
        if len(_DIGESTS) >= _DIGESTS_MAX:
            _DIGESTS.clear()
        _DIGESTS[memo] = digest
    return digest


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
        return _inputs_digest(kept) if kept else None

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
            variables = {
                **ctx.extra,
                "parameters": dict(inputs),
                "task_name": ctx.task_name,
                "run_id": ctx.run_id,
                "task_run": ctx.task_run,
            }
            return result_storage_key.format(**variables) or None
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
