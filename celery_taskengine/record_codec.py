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
from typing import TYPE_CHECKING, Any

from kombu import serialization
from kombu.exceptions import EncodeError, SerializerNotInstalled

from celery_taskengine.errors import SerializationError
from celery_taskengine.result_store import ResultRecord

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
    accepted = normalize_accept(accept)
    content_type = _content_type(serializer)
    if content_type is None:
        raise _encode_error(key, value, serializer, task_name, "no such serializer is registered")
    if serializer not in accepted:
        reason = f"the app does not accept {serializer!r} content (see result_accept_content)"
        raise _encode_error(key, value, serializer, task_name, reason)
    try:
        _, content_encoding, payload = _dumps(value, serializer=serializer)
    except (EncodeError, SerializerNotInstalled) as exc:  # the latter: its library is missing
        raise _encode_error(key, value, serializer, task_name, str(exc)) from exc
    if isinstance(payload, bytes):
        text = base64.b64encode(payload).decode("ascii")
        content_encoding = _BINARY
    else:
        text = str(payload)
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
    return json.dumps(envelope, separators=(",", ":")).encode("utf-8")


def decode_record(
    raw: bytes | str, accept: Iterable[str], *, key: str | None = None
) -> ResultRecord:
    """The record stored as ``raw``; with ``key``, it must also be the record *of* that key.

    Raises ``ValueError`` for anything that is not one of our envelopes (corrupt bytes, another
    program's JSON, a newer envelope version), for a serializer not in ``accept`` (the payload
    is then not even looked at), and for a payload that does not decode.
    """
    envelope = _parse_envelope(raw)
    serializer = _field(envelope, "serializer")
    if serializer not in normalize_accept(accept):
        raise ValueError(f"record uses serializer {serializer!r}, which is not accepted")
    content_type = _content_type(serializer)
    if content_type is None or envelope.get("content_type") != content_type:
        raise ValueError(f"record has an unknown or inconsistent serializer {serializer!r}")
    record_key = _field(envelope, "key")
    if key is not None and record_key != key:
        raise ValueError(f"record belongs to key {record_key!r}")
    return ResultRecord(
        key=record_key,
        value=_decode_payload(envelope, content_type),
        serializer=serializer,
        created_at=_parse_time(_field(envelope, "created_at")),
        expires_at=_optional_time(envelope.get("expires_at")),
        task_name=_optional_str(envelope.get("task")),
    )


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
    if not isinstance(envelope, dict) or envelope.get("cte") != ENVELOPE_VERSION:
        raise ValueError("not a celery-taskengine record (foreign or newer envelope)")
    return envelope


def _decode_payload(envelope: dict[str, Any], content_type: str) -> Any:
    payload: str | bytes = _field(envelope, "payload")
    content_encoding = _field(envelope, "content_encoding")
    if content_encoding == _BINARY:
        try:
            payload = base64.b64decode(payload, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"record payload is not base64: {exc}") from exc
    try:
        return _loads(payload, content_type, content_encoding, accept={content_type})
    except Exception as exc:  # a payload may fail in any way (e.g. unpickling a removed class)
        raise ValueError(f"record payload does not decode: {exc!r}") from exc


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
