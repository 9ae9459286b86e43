"""What packing the engine's Redis commands costs: redis-py's packer against the engine's own.

In one run, prints the median cost (µs per call, over rounds of many calls) of turning into RESP:
a cache hit's ``GET``; a worker run's record write and its index update (the script call and
arguments the worker sends at Running and at its end); and one script call's worth of local
run records, 64 (:mod:`celery_taskengine._store.record_batch`). Both packers get the same
commands, and the script checks they write the same bytes. No Redis is needed: packing is
local work.

    python bench/packing.py [--calls 2000] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import redis

from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._store.claims import Claim
from celery_taskengine._store.record_batch import Batch
from celery_taskengine._store.run_document import RunDocument
from celery_taskengine._store.run_index import RunIndex
from celery_taskengine._store.wire import pack, redis_pack
from celery_taskengine.states import Cached, Pending, Running

PREFIX = "cte:bench:"
Commands = Sequence[tuple[Any, ...]]
Packer = Callable[[Any, Commands], bytes]


def a_hit(task_name: str) -> TaskRun:
    """A run as a local cache hit leaves it."""
    run = TaskRun(id=str(uuid.uuid4()), name=task_name, task_name=task_name, parameters={"x": 3})
    for state in (Pending(), Running(), Cached({"x": 3, "square": 9})):
        run.state, run.state_history = state, [*run.state_history, state]
    run.start_time, run.end_time = run.state_history[1].timestamp, run.state.timestamp
    return run


def worker_commands(index: RunIndex, run: TaskRun) -> list[tuple[Any, ...]]:
    """A worker's write of a run record with its index entry, fenced by its claim (one
    script call), as ``worker_records`` sends it."""
    key = f"{PREFIX}run:{run.id}"
    claim = Claim(store=None, key=f"{PREFIX}claim:{run.id}:0", run_id=run.id, ttl=15.0)  # type: ignore[arg-type]
    document = RunDocument(run).encode(run)
    index_entry = index.for_run(run, time.time())
    return [claim.record_command(key, document, "86400000", settle=True, index=index_entry)]


def per_call_us(packer: Packer, connection: Any, commands: Commands, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        packer(connection, commands)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    connection = redis.Connection()  # packs without connecting
    index = RunIndex(PREFIX, 86_400.0)
    runs = [a_hit("bench.square") for _ in range(64)]
    records = [(f"{PREFIX}run:{run.id}", RunDocument(run).encode(run), run) for run in runs]
    cases: dict[str, Commands] = {
        "cache hit GET": [("GET", f"{PREFIX}cache:0123456789abcdef")],
        "worker record + index": worker_commands(index, runs[0]),
        "batch of 64 local records": [Batch(0, index, records, "86400000").command],
    }
    print(f"{'commands':<28} {'redis-py µs':>12} {'engine µs':>10} {'ratio':>7}")
    for name, commands in cases.items():
        assert pack(connection, commands) == redis_pack(connection, commands)
        calls = max(1, args.calls // (64 if name.startswith("batch") else 1))
        samples: dict[str, list[float]] = {"redis-py": [], "engine": []}
        for _ in range(args.repeats):  # alternating, so a busy machine slows both alike
            samples["redis-py"].append(per_call_us(redis_pack, connection, commands, calls))
            samples["engine"].append(per_call_us(pack, connection, commands, calls))
        theirs, ours = (statistics.median(samples[packer]) for packer in ("redis-py", "engine"))
        print(f"{name:<28} {theirs:>12.1f} {ours:>10.1f} {theirs / ours:>6.1f}x")


if __name__ == "__main__":
    main()
