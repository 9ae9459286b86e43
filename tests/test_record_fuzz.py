"""The record decoders under fuzzing: whatever is found in Redis, they raise ``ValueError`` or
nothing (SPEC §8: a corrupt record is a miss with a warning, never a crash); and what the engine
writes, they read back unchanged.

``decode_record`` reads cache records, ``run_from_document`` reads run records. The stores turn
``ValueError`` into a warning and a miss, so any other exception would be a crash in a worker.
"""

from __future__ import annotations

import base64
import json
import math
from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celery_taskengine._engine.task_run import TaskRun, run_from_document
from celery_taskengine._store.cache_codec import decode_record, encode_record
from celery_taskengine._store.protocol import ResultRecord
from celery_taskengine.errors import TaskRunTimeoutError
from celery_taskengine.states import State, StateType

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JSON_ONLY = frozenset({"json"})
JSON_AND_PICKLE = frozenset({"json", "pickle"})

# --- strategies -------------------------------------------------------------------------------

#: Dict keys for values that must round-trip. kombu's JSON decoder turns any object with a
#: ``"__type__"`` key into the type it names (or fails), so such dicts are left out: a value
#: shaped like ``{"__type__": "bytes", "__value__": ...}`` does not survive kombu's JSON.
keys = st.text(max_size=8).filter(lambda k: k != "__type__")


def json_values(*, allow_nan: bool) -> st.SearchStrategy[Any]:
    """Any value JSON can carry (nested lists and dicts), NaN and infinities if asked."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=allow_nan, allow_infinity=allow_nan)
        | st.text(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(keys if not allow_nan else st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=16,
    )


roundtrip_values = json_values(allow_nan=False)
#: Values that break naive field handling (``int(inf)``, ``int(nan)``, empty containers).
edge_values = st.sampled_from([math.inf, -math.inf, math.nan, 10**400, -1, 0, "", [], {}, True])
any_json = json_values(allow_nan=True) | edge_values
#: Offsets in whole seconds: what ``isoformat`` writes, ``fromisoformat`` reads back.
zones = st.builds(
    timezone,
    st.integers(min_value=-86_399, max_value=86_399).map(lambda s: timedelta(seconds=s)),
)
aware_times = st.datetimes(timezones=zones)


def encoded_envelope(value: Any, *, serializer: str = "json") -> dict[str, Any]:
    """A valid record of ``value`` under key ``"k"``, as the dict its JSON holds."""
    accept = JSON_AND_PICKLE if serializer == "pickle" else JSON_ONLY
    raw = encode_record(
        "k",
        value,
        serializer=serializer,
        accept=accept,
        created_at=datetime(2024, 1, 2, tzinfo=timezone.utc),
        task_name="fuzz.task",
    )
    envelope: dict[str, Any] = json.loads(raw)
    return envelope


def decodes_or_refuses(raw: bytes | str, accept: frozenset[str], key: str | None = None) -> None:
    """The decoder's contract: a record (of ``key``, if given) or ``ValueError``; nothing else."""
    try:
        record = decode_record(raw, accept, key=key)
    except ValueError:
        return
    assert isinstance(record, ResultRecord)
    assert record.serializer in accept
    if key is not None:
        assert record.key == key


# --- decode_record never crashes ----------------------------------------------------------


@FUZZ
@given(raw=st.binary(max_size=512))
def test_decoding_arbitrary_bytes_raises_only_value_error(raw: bytes) -> None:
    decodes_or_refuses(raw, JSON_ONLY)
    decodes_or_refuses(raw, JSON_AND_PICKLE, key="k")


@FUZZ
@given(value=any_json, as_text=st.booleans())
def test_decoding_any_json_document_raises_only_value_error(value: Any, as_text: bool) -> None:
    text = json.dumps(value)
    decodes_or_refuses(text if as_text else text.encode(), JSON_ONLY)


@FUZZ
@given(
    value=roundtrip_values,
    field=st.sampled_from(
        [
            "cte",
            "key",
            "task",
            "serializer",
            "content_type",
            "content_encoding",
            "created_at",
            "expires_at",
            "payload",
            "extra",
        ]
    ),
    replacement=any_json | st.sampled_from(["pickle", "binary", "2024-01-01T00:00:00", ""]),
    drop=st.booleans(),
)
def test_decoding_an_envelope_with_one_field_changed_raises_only_value_error(
    value: Any, field: str, replacement: Any, drop: bool
) -> None:
    envelope = encoded_envelope(value)
    if drop:
        envelope.pop(field, None)
    else:
        envelope[field] = replacement
    decodes_or_refuses(json.dumps(envelope).encode(), JSON_ONLY, key="k")


@FUZZ
@given(
    field=st.sampled_from(["serializer", "content_type", "content_encoding", "payload", "key"]),
    replacement=any_json | st.sampled_from(["json", "utf-8", "application/json", "AAAA"]),
)
def test_decoding_a_pickle_envelope_with_one_field_changed_raises_only_value_error(
    field: str, replacement: Any
) -> None:
    envelope = encoded_envelope({1, 2, 3}, serializer="pickle")
    envelope[field] = replacement
    raw = json.dumps(envelope).encode()
    decodes_or_refuses(raw, JSON_AND_PICKLE, key="k")
    decodes_or_refuses(raw, JSON_ONLY, key="k")


@FUZZ
@given(value=roundtrip_values, data=st.data())
def test_decoding_an_envelope_with_bytes_flipped_inserted_or_cut_raises_only_value_error(
    value: Any, data: st.DataObject
) -> None:
    raw = bytearray(json.dumps(encoded_envelope(value)).encode())
    for _ in range(data.draw(st.integers(min_value=1, max_value=4), label="edits")):
        at = data.draw(st.integers(min_value=0, max_value=len(raw) - 1), label="at")
        edit = data.draw(st.sampled_from(["flip", "insert", "cut"]), label="edit")
        byte = data.draw(st.integers(min_value=0, max_value=255), label="byte")
        if edit == "flip":
            raw[at] = byte
        elif edit == "insert":
            raw.insert(at, byte)
        else:
            del raw[at:]
            if not raw:
                break
    decodes_or_refuses(bytes(raw), JSON_ONLY, key="k")


def test_decoding_json_nested_deeper_than_the_interpreter_allows_raises_value_error() -> None:
    for raw in (b"[" * 100_000 + b"]" * 100_000, '{"a":' * 100_000):
        decodes_or_refuses(raw, JSON_ONLY)


def test_a_pickle_payload_passed_off_as_base64_garbage_raises_value_error() -> None:
    envelope = encoded_envelope({1}, serializer="pickle")
    envelope["payload"] = base64.b64encode(b"\x80\x05not a pickle").decode()
    decodes_or_refuses(json.dumps(envelope), JSON_AND_PICKLE)


# --- encode_record -> decode_record round-trips -----------------------------------------------


@FUZZ
@given(
    value=roundtrip_values,
    key=st.text(max_size=30),
    task_name=st.none() | st.text(max_size=30),
    created_at=aware_times,
    lifetime=st.none() | st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=3650)),
)
def test_what_is_encoded_decodes_to_an_equal_record(
    value: Any,
    key: str,
    task_name: str | None,
    created_at: datetime,
    lifetime: timedelta | None,
) -> None:
    expires_at = None
    if lifetime is not None and created_at + lifetime < datetime.max.replace(tzinfo=timezone.utc):
        expires_at = created_at + lifetime
    raw = encode_record(
        key,
        value,
        serializer="json",
        accept=JSON_ONLY,
        created_at=created_at,
        expires_at=expires_at,
        task_name=task_name,
    )

    record = decode_record(raw, JSON_ONLY, key=key)

    assert record.value == value
    assert (record.key, record.task_name, record.serializer) == (key, task_name, "json")
    assert record.created_at == created_at and record.expires_at == expires_at


# --- run_from_document never crashes --------------------------------------------------------


def valid_document() -> dict[str, Any]:
    history = [
        State(StateType.PENDING, "Pending"),
        State(StateType.RUNNING, "Running"),
        State(StateType.FAILED, "Failed", "boom", data=ValueError("boom")),
    ]
    run = TaskRun(
        id="r",
        name="n",
        task_name="t",
        parameters={"x": 1},
        run_count=1,
        state=history[-1],
        state_history=history,
    )
    return run.to_document()


DOCUMENT_FIELDS = [
    "v",
    "id",
    "name",
    "task_name",
    "parameters",
    "tags",
    "run_count",
    "start_time",
    "end_time",
    "state_history",
]
STATE_FIELDS = ["type", "name", "message", "timestamp", "scheduled_time", "data", "exception"]


def reads_or_refuses(document: Any) -> None:
    """``run_from_document``'s contract: a TaskRun or ``ValueError``; nothing else."""
    try:
        run = run_from_document(document)
    except ValueError:
        return
    assert isinstance(run, TaskRun)
    assert run.state is (run.state_history[-1] if run.state_history else None)


@FUZZ
@given(document=any_json)
def test_reading_any_json_as_a_run_record_raises_only_value_error(document: Any) -> None:
    reads_or_refuses(document)
    # The Redis store parses the bytes first, and Python's json reads NaN and Infinity too
    reads_or_refuses(json.loads(json.dumps(document)))


@FUZZ
@given(field=st.sampled_from(DOCUMENT_FIELDS), replacement=any_json, drop=st.booleans())
def test_reading_a_run_record_with_one_field_changed_raises_only_value_error(
    field: str, replacement: Any, drop: bool
) -> None:
    document = valid_document()
    if drop:
        del document[field]
    else:
        document[field] = replacement
    reads_or_refuses(document)


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(DOCUMENT_FIELDS), any_json, max_size=4),
    drop=st.lists(st.sampled_from(DOCUMENT_FIELDS), max_size=2),
)
def test_reading_a_run_record_with_several_fields_changed_raises_only_value_error(
    changes: dict[str, Any], drop: list[str]
) -> None:
    document = {**valid_document(), **changes}
    for name in drop:
        document.pop(name, None)
    reads_or_refuses(document)


@FUZZ
@given(
    index=st.integers(min_value=0, max_value=2),
    changes=st.dictionaries(
        st.sampled_from(STATE_FIELDS),
        any_json
        | st.sampled_from(["COMPLETED", "2024-01-01T00:00:00+00:00"])
        | st.fixed_dictionaries(
            {},
            optional={
                "exc_type": any_json | st.sampled_from(["ValueError", "SystemExit", "a.b"]),
                "exc_module": any_json | st.sampled_from(["builtins", "os", "no.such"]),
                "exc_message": any_json,
            },
        ),
        max_size=3,
    ),
)
def test_reading_a_run_record_with_a_state_changed_raises_only_value_error(
    index: int, changes: dict[str, Any]
) -> None:
    document = valid_document()
    document["state_history"][index].update(changes)
    reads_or_refuses(document)


# --- TaskRun.to_document -> run_from_document round-trips -----------------------------------

exceptions = (
    st.builds(ValueError, st.text(max_size=20))
    | st.builds(RuntimeError, st.text(max_size=20))
    | st.builds(TaskRunTimeoutError, st.floats(min_value=0, max_value=1e6))
)
states = st.builds(
    State,
    type=st.sampled_from(StateType),
    name=st.text(min_size=1, max_size=20),
    message=st.none() | st.text(max_size=40),
    timestamp=aware_times,
    scheduled_time=st.none() | aware_times,
)


@FUZZ
@given(
    history=st.lists(states, max_size=6),
    data=st.none() | roundtrip_values | exceptions,
    run_id=st.text(max_size=20),
    parameters=st.dictionaries(st.text(max_size=8), roundtrip_values, max_size=4),
    tags=st.frozensets(st.text(max_size=8), max_size=4),
    run_count=st.integers(min_value=0, max_value=1000),
    start_time=st.none() | aware_times,
    end_time=st.none() | aware_times,
)
def test_a_run_record_reads_back_with_its_whole_history(
    history: list[State],
    data: Any,
    run_id: str,
    parameters: dict[str, Any],
    tags: frozenset[str],
    run_count: int,
    start_time: datetime | None,
    end_time: datetime | None,
) -> None:
    if history:
        history[-1] = history[-1].with_data(data)
    run = TaskRun(
        id=run_id,
        name="fuzzed",
        task_name="fuzz.task",
        parameters=parameters,
        tags=tags,
        run_count=run_count,
        start_time=start_time,
        end_time=end_time,
        state=history[-1] if history else None,
        state_history=history,
    )

    # Through JSON text, as the Redis store keeps it
    loaded = run_from_document(json.loads(json.dumps(run.to_document())))

    assert (loaded.id, loaded.name, loaded.task_name) == (run_id, "fuzzed", "fuzz.task")
    assert (loaded.parameters, loaded.tags, loaded.run_count) == (parameters, tags, run_count)
    assert (loaded.start_time, loaded.end_time) == (start_time, end_time)
    assert [without_data(s) for s in loaded.state_history] == [without_data(s) for s in history]
    if not history:
        assert loaded.state is None
        return
    assert loaded.state is loaded.state_history[-1]
    if isinstance(data, BaseException):
        assert type(loaded.state.data) is type(data)
        assert str(loaded.state.data) == str(data)
    else:
        assert loaded.state.data == data


def without_data(state: State) -> tuple[Any, ...]:
    return (state.type, state.name, state.message, state.timestamp, state.scheduled_time)


def test_json_payloads_decode_to_what_kombu_gives_with_and_without_tagged_values() -> None:
    moment = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    now = datetime.now(timezone.utc)
    for value in ({"x": 3, "square": 9}, {"when": moment, "s": "é"}, [b"\x00raw"]):
        raw = encode_record("k", value, serializer="json", accept={"json"}, created_at=now)

        assert decode_record(raw, {"json"}, key="k").value == value
