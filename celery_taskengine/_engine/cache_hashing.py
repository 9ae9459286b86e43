"""Stable digests of cache-key inputs: the same in every process and on every machine.

Pure: canonical JSON (sorted keys, tagged forms for common non-JSON values), pickle as the
fallback, and a small memo for the plain scalar inputs a cached task is called with again and
again.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import hashlib
import json
import pickle
import uuid
from pathlib import PurePath
from typing import Any

__all__ = ["hash_objects", "inputs_digest"]

# Pinned so that a key computed by one Python version matches the one computed by another.
_PICKLE_PROTOCOL = 4


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


# Built once: json.dumps with options would build a new encoder for every call.
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


def inputs_digest(inputs: dict[str, Any]) -> str:
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
