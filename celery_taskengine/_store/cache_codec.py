"""How a cached result record becomes bytes and back, the same way in every store.

A record is a small JSON envelope around a payload encoded by one of kombu's serializers
(JSON by default, as Celery results are)::

    {"cte": 1, "key": "...", "task": "..." | null, "serializer": "json",
     "content_type": "application/json", "content_encoding": "utf-8",
     "created_at": "<ISO 8601, UTC>", "expires_at": "<ISO 8601>" | null,
     "payload": "<the serialized value; base64 when the serializer emits bytes>"}

The envelope is what makes a record recognisable (``"cte": 1``): anything else found under one
of our keys is foreign and reads as a miss. ``pickle`` is used only when the caller asks for it
*and* the app accepts it; a record whose serializer is not accepted is never decoded, so a
hostile pickle planted in Redis is never loaded. JSON is always accepted: the envelope itself
is JSON, so refusing JSON payloads would protect nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from kombu import serialization
from kombu.exceptions import EncodeError, SerializerNotInstalled
from kombu.utils import json as kombu_json

from celery_taskengine._store.protocol import ResultRecord
from celery_taskengine.errors import SerializationError

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "ENVELOPE_VERSION",
    "accept_for_app",
    "decode_record",
    "encode_record",
    "normalize_accept",
]

#: The ``"cte"`` marker of the envelope; bumped if the layout ever changes incompatibly.
ENVELOPE_VERSION = 1

# kombu ships no type hints; these give its two entry points the types we rely on.
_dumps: Callable[..., tuple[str, str, str | bytes]] = serialization.dumps
_loads: Callable[..., Any] = serialization.loads

#: kombu's content encoding for payloads that are bytes (pickle, msgpack); stored as base64.
_BINARY = "binary"
_JSON = "application/json"
#: The decoder kombu registers for JSON; another one registered in its place is always used.
_KOMBU_JSON_LOADS = kombu_json.loads
# Built once: json.dumps with options builds a new encoder on every call.
_ENVELOPE_ENCODER = json.JSONEncoder(separators=(",", ":"))


def normalize_accept(accept: Iterable[str] | None) -> frozenset[str]:
    """Serializer names from a Celery-style accept list (names or MIME types), plus ``json``.

    ``None`` means the Celery default, JSON only. Unknown MIME types are kept as given; they
    simply never match a registered serializer.
    """
    names = {"json"}
    for item in accept or ():
        text = str(item).strip().lower()
        names.add(serialization.registry.type_to_name.get(text, text))
    return frozenset(names)


def accept_for_app(app: Celery) -> frozenset[str]:
    """What the app lets its result backend decode: ``result_accept_content``, else
    ``accept_content`` (the same fallback Celery applies)."""
    conf = app.conf
    return normalize_accept(conf.result_accept_content or conf.accept_content)


def encode_record(
    key: str,
    value: Any,
    *,
    serializer: str,
    accept: Iterable[str],
    created_at: datetime,
    expires_at: datetime | None = None,
    task_name: str | None = None,
) -> bytes:
    """The stored form of ``value`` under ``key``.

    Raises :class:`SerializationError` (naming the task, key, value type and serializer) when
    the serializer is unknown or not accepted, or when the value cannot be encoded; nothing has
    been written at that point.
    """
    content_type, content_encoding, text = _payload(key, value, serializer, accept, task_name)
    envelope = {
        "cte": ENVELOPE_VERSION,
        "key": key,
        "task": task_name,
        "serializer": serializer,
        "content_type": content_type,
        "content_encoding": content_encoding,
        "created_at": created_at.isoformat(),
        "expires_at": expires_at.isoformat() if expires_at is not None else None,
        "payload": text,
    }
    return _ENVELOPE_ENCODER.encode(envelope).encode("utf-8")


def _payload(
    key: str, value: Any, serializer: str, accept: Iterable[str], task_name: str | None
) -> tuple[str, str, str]:
    """``(content_type, content_encoding, text)`` of ``value``; binary payloads as base64.
    Raises :class:`SerializationError` as :func:`encode_record` says."""
    content_type = _content_type(serializer)
    if content_type is None:
        raise _encode_error(key, value, serializer, task_name, "no such serializer is registered")
    if serializer not in normalize_accept(accept):
        reason = f"the app does not accept {serializer!r} content (see result_accept_content)"
        raise _encode_error(key, value, serializer, task_name, reason)
    try:
        _, content_encoding, payload = _dumps(value, serializer=serializer)
    except (EncodeError, SerializerNotInstalled) as exc:  # the latter: its library is missing
        raise _encode_error(key, value, serializer, task_name, str(exc)) from exc
    if isinstance(payload, bytes):
        return content_type, _BINARY, base64.b64encode(payload).decode("ascii")
    return content_type, content_encoding, str(payload)


def decode_record(
    raw: bytes | str, accept: Iterable[str], *, key: str | None = None
) -> ResultRecord:
    """The record stored as ``raw``; with ``key``, it must also be the record *of* that key.

    Raises ``ValueError`` for anything that is not one of our envelopes (corrupt bytes, another
    program's JSON, a newer envelope version), for a serializer not in ``accept`` (the payload
    is then not even looked at), and for a payload that does not decode. The payload is
    decoded on every call, so each caller gets a fresh value.
    """
    envelope = _envelope_of(raw)
    serializer = envelope.serializer
    # A name found as is in a set is accepted; normalizing (the stores pass a normalized set)
    # is only needed to answer "no" or for MIME types.
    named = isinstance(accept, set | frozenset) and serializer in accept
    if not named and serializer not in normalize_accept(accept):
        raise ValueError(f"record uses serializer {serializer!r}, which is not accepted")
    content_type = _content_type(serializer)
    if content_type is None or envelope.content_type != content_type:
        raise ValueError(f"record has an unknown or inconsistent serializer {serializer!r}")
    if key is not None and envelope.key != key:
        raise ValueError(f"record belongs to key {envelope.key!r}")
    return ResultRecord(
        key=envelope.key,
        value=_decode_payload(envelope.payload, content_type, envelope.content_encoding),
        serializer=serializer,
        created_at=envelope.created_at,
        expires_at=envelope.expires_at,
        task_name=envelope.task_name,
    )


class _Envelope(NamedTuple):
    """An envelope's checked fields; the payload is still encoded."""

    key: str
    serializer: str
    content_type: Any
    content_encoding: str
    payload: str
    created_at: datetime
    expires_at: datetime | None
    task_name: str | None


#: Envelopes already parsed, by their stored form. A cache hit reads the same bytes again and
#: again, and parsing the envelope was half the cost of decoding it. Small records only, and
#: few of them (cleared when full), so this holds a few MiB at most.
_ENVELOPES: dict[bytes | str, _Envelope] = {}
_ENVELOPES_MAX = 256
_ENVELOPE_MAX_BYTES = 16 * 1024


def _envelope_of(raw: bytes | str) -> _Envelope:
    memoizable = type(raw) in (bytes, str) and len(raw) <= _ENVELOPE_MAX_BYTES
    if memoizable and (known := _ENVELOPES.get(raw)) is not None:
        return known
    envelope = _parse_envelope(raw)
    parsed = _Envelope(
        key=_field(envelope, "key"),
        serializer=_field(envelope, "serializer"),
        content_type=envelope.get("content_type"),
        content_encoding=_field(envelope, "content_encoding"),
        payload=_field(envelope, "payload"),
        created_at=_parse_time(_field(envelope, "created_at")),
        expires_at=_optional_time(envelope.get("expires_at")),
        task_name=_optional_str(envelope.get("task")),
    )
    if memoizable:
        if len(_ENVELOPES) >= _ENVELOPES_MAX:
            _ENVELOPES.clear()
        _ENVELOPES[raw] = parsed
    return parsed


def _content_type(serializer: str) -> str | None:
    """The MIME type of a serializer kombu knows by name (``raw`` and unknowns: ``None``)."""
    content_type: str | None = serialization.registry.name_to_type.get(serializer)
    return content_type


def _encode_error(
    key: str, value: Any, serializer: str, task_name: str | None, reason: str
) -> SerializationError:
    whose = f"result of task {task_name!r} (key {key!r})" if task_name else f"value of key {key!r}"
    kind = type(value).__qualname__
    return SerializationError(
        f"{whose}, of type {kind!r}, cannot be serialized with {serializer!r}: {reason}"
    )


def _parse_envelope(raw: bytes | str) -> dict[str, Any]:
    try:
        envelope = json.loads(raw)
    except (TypeError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"record is not JSON: {exc}") from exc
    except RecursionError as exc:  # ``[[[[…`` nested deeper than the interpreter allows
        raise ValueError("record is not JSON: nested too deeply") from exc
    if not isinstance(envelope, dict) or envelope.get("cte") != ENVELOPE_VERSION:
        raise ValueError("not a celery-taskengine record (foreign or newer envelope)")
    return envelope


def _decode_payload(payload: str, content_type: str, content_encoding: str) -> Any:
    if content_type == _JSON and content_encoding == "utf-8" and _plain_json(payload):
        try:
            return json.loads(payload)
        except Exception as exc:  # RecursionError too: ``[[[[…`` nested too deeply
            raise ValueError(f"record payload does not decode: {exc!r}") from exc
    data: str | bytes = payload
    if content_encoding == _BINARY:
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"record payload is not base64: {exc}") from exc
    try:
        return _loads(data, content_type, content_encoding, accept={content_type})
    except Exception as exc:  # a payload may fail in any way (e.g. unpickling a removed class)
        raise ValueError(f"record payload does not decode: {exc!r}") from exc


def _plain_json(payload: str) -> bool:
    """Whether kombu would decode ``payload`` exactly as ``json.loads`` does (the common case).

    kombu's JSON decoder differs only by turning ``{"__type__": ..., "__value__": ...}``
    objects into datetimes, UUIDs, bytes and so on; a payload with no ``__type__`` (not even
    one spelled with ``\\u`` escapes) holds none. Going through kombu costs twice as much.
    """
    return (
        bool(payload)
        and "__type__" not in payload
        and "\\u" not in payload
        and serialization.registry._decoders.get(_JSON) is _KOMBU_JSON_LOADS
    )


def _field(envelope: dict[str, Any], name: str) -> str:
    value = envelope.get(name)
    if not isinstance(value, str):
        raise ValueError(f"record field {name!r} is missing or not a string")
    return value


def _optional_str(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValueError("record field 'task' is not a string")


def _parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)  # raises ValueError for a malformed time
    if moment.tzinfo is None:  # comparing it with an aware 'now' would raise TypeError later
        raise ValueError(f"record time {text!r} has no time zone")
    return moment


def _optional_time(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("record field 'expires_at' is not a string")
    return _parse_time(value)
