"""The engine's RESP packer writes exactly what redis-py's own packer writes."""

from __future__ import annotations

from typing import Any

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celery_taskengine._store.wire import pack, redis_pack

ARGUMENTS = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False),
)
COMMANDS = st.lists(
    st.tuples(st.sampled_from(["GET", "SET", "EVAL", "ZADD", "SCRIPT LOAD"])).flatmap(
        lambda name: st.lists(ARGUMENTS, max_size=8).map(lambda args: (*name, *args))
    ),
    max_size=5,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands=COMMANDS)
def test_pack_writes_what_redis_py_writes(commands: list[tuple[Any, ...]]) -> None:
    for connection in (redis.Connection(), redis.Connection(protocol=3, encoding="latin-1")):
        try:
            expected = redis_pack(connection, commands)
        except UnicodeEncodeError:  # text latin-1 cannot carry: both refuse it
            continue
        assert pack(connection, commands) == expected


def test_pack_writes_a_long_argument_whole() -> None:
    connection = redis.Connection()
    command = ("SET", "key", "x" * 100_000, "PX", 86_400_000)
    assert pack(connection, [command]) == redis_pack(connection, [command])
