"""What a cached result costs: Redis round trips against cache hits and misses through the engine.

In one run, against the local Redis (``127.0.0.1:6379``, a high database, a namespace of its own
whose keys are deleted at the end), prints the median cost per call of:

- a plain function call, as the baseline;
- a plain redis-py ``GET`` and ``SET`` on the result backend's own client (one round trip each);
- a memory hit followed by one ``GET``: the engine's work and a read, one after the other (a
  Redis hit sends its read first and does that work while the answer travels);
- a cache hit ``t(3)`` and a cache miss that writes (``refresh_cache=True``, and new inputs)
  through the engine, on the Redis result backend;
- the same hit and misses on the in-memory store (an app without a result backend);
- diagnostic: the Redis hit and miss with run recording switched off, which isolates the cache
  path from the run record the engine writes to the backend for every local run.

Cases are measured round-robin (one batch of each, repeated), so a busy machine slows them all
alike; the medians are printed. "Commands" is the Redis commands one call makes, counted with
``INFO commandstats`` (which counts a script's own commands too): a hit is one ``GET``; its run
record is written behind it by the flusher thread, in one script call with the other records
held then, whose reply the flusher reads. No assertions: this is a measurement.

    python bench/cache_costs.py [--url redis://127.0.0.1:6379/14] [--calls 1000] [--repeats 9]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery

from celery_taskengine import flush_run_records, task
from celery_taskengine._engine.observers import NO_OBSERVERS
from celery_taskengine._store.redis_store import RedisStore
from celery_taskengine._store.selection import store_for_app
from celery_taskengine.cache_policies import INPUTS
from celery_taskengine.task_engine import local_environment


def square(x: int) -> dict[str, int]:
    return {"x": x, "square": x * x}


def cached_tasks(app: Celery, name: str) -> tuple[Any, Any]:
    """A cached task and its always-refreshing twin (same name, so the same keys)."""
    cached = task(app=app, name=name, cache_policy=INPUTS)(square)
    return cached, cached.with_options(refresh_cache=True)


def without_run_records(t: Any) -> Any:
    """``t`` with its local runs not recorded on the store (diagnostic only)."""
    quiet = t.with_options()
    local_environment(quiet, None).observers = NO_OBSERVERS
    return quiet


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def commands_sent(client: redis.Redis) -> int:
    stats: dict[str, dict[str, int]] = client.info("commandstats")
    return sum(entry["calls"] for entry in stats.values())


def commands_per_call(client: redis.Redis, fn: Callable[[], Any], calls: int = 50) -> float:
    """Redis commands per call of ``fn`` (INFO itself counts one, subtracted).

    Local runs' records are written behind the caller: they are flushed before and after
    counting, so each call's share is counted.
    """
    flush_run_records()
    before = commands_sent(client)
    for _ in range(calls):
        fn()
    flush_run_records()
    return (commands_sent(client) - before - 1) / calls


def measure(
    cases: list[tuple[str, Callable[[], Any]]], calls: int, repeats: int
) -> dict[str, float]:
    for _, fn in cases:
        fn()  # warm up: connections, source text, code paths
    samples: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(repeats):
        for name, fn in cases:
            samples[name].append(per_call_us(fn, calls))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--calls", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    namespace = f"bench-{os.getpid()}"

    redis_app = Celery("bench-cache-redis", set_as_current=False)
    redis_app.conf.update(
        broker_url=args.url, result_backend=args.url, taskengine_namespace=namespace
    )
    memory_app = Celery("bench-cache-memory", set_as_current=False)  # no backend: memory store
    store = store_for_app(redis_app)
    assert isinstance(store, RedisStore), "the Redis app must get a RedisStore"
    client: redis.Redis = store.client
    probe = store.key_for("cache", "probe")
    payload = b"x" * 240  # about the size of this benchmark's records

    fresh = itertools.count(1_000_000)
    redis_hit, redis_refresh = cached_tasks(redis_app, "bench.redis.square")
    memory_hit, memory_refresh = cached_tasks(memory_app, "bench.memory.square")
    quiet_hit, quiet_refresh = without_run_records(redis_hit), without_run_records(redis_refresh)
    client.set(probe, payload)
    uncached = task(app=memory_app, name="bench.memory.uncached")(square)
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("plain call square(3)", lambda: square(3)),
        ("engine, no cache: t(3) on memory", lambda: uncached(3)),
        ("redis-py GET", lambda: client.get(probe)),
        ("redis-py SET", lambda: client.set(probe, payload)),
        ("serial: memory hit, then one GET", lambda: (memory_hit(3), client.get(probe))),
        ("redis: cache hit t(3)", lambda: redis_hit(3)),
        ("redis: miss + write (refresh_cache)", lambda: redis_refresh(3)),
        ("redis: miss + write (new inputs)", lambda: redis_hit(next(fresh))),
        ("memory: cache hit t(3)", lambda: memory_hit(3)),
        ("memory: miss + write (refresh_cache)", lambda: memory_refresh(3)),
        ("memory: miss + write (new inputs)", lambda: memory_hit(next(fresh))),
        ("diagnostic, no run records: redis hit", lambda: quiet_hit(3)),
        ("diagnostic, no run records: redis miss", lambda: quiet_refresh(3)),
    ]
    try:
        sent = {name: commands_per_call(client, fn) for name, fn in cases if _on_redis(name)}
        medians = measure(cases, args.calls, args.repeats)
    finally:
        flush_run_records()  # records written behind the calls land before the clean-up
        names = list(client.scan_iter(match=f"cte:{namespace}:*", count=1000))
        for offset in range(0, len(names), 1000):
            client.delete(*names[offset : offset + 1000])
        redis_app.close()
        memory_app.close()

    get_us, set_us = medians["redis-py GET"], medians["redis-py SET"]
    print(f"Redis {args.url}, {args.calls} calls x {args.repeats} rounds, medians\n")
    print(f"{'case':<40} {'µs/call':>9} {'commands':>12} {'minus 1 GET':>12}")
    for name, _ in cases:
        value = medians[name]
        count = f"{sent[name]:.1f}" if name in sent else "-"
        over = f"{value - get_us:.1f}" if name in sent and not name.startswith("redis-py") else ""
        print(f"{name:<40} {value:>9.1f} {count:>12} {over:>12}")
    hit = medians["redis: cache hit t(3)"]
    quiet = medians["diagnostic, no run records: redis hit"]
    serial = medians["serial: memory hit, then one GET"]
    engine_us = medians["engine, no cache: t(3) on memory"]
    memory_hit_us = medians["memory: cache hit t(3)"]
    print(
        f"\nhit minus one GET: {hit - get_us:.1f} µs (target: at most 30 µs); "
        f"{(hit - get_us) / set_us:.1f} SETs' worth, one SET costing {set_us:.1f} µs.\n"
        f"without run records: {quiet - get_us:.1f} µs over one GET; {quiet - serial:+.1f} µs "
        f"against a memory hit's work done before one GET instead of while it travels.\n"
        f"engine, no cache: {engine_us:.1f} µs; "
        f"a memory hit adds {memory_hit_us - engine_us:.1f} µs to it."
    )


def _on_redis(case: str) -> bool:
    return case.startswith(("redis", "diagnostic", "serial"))


if __name__ == "__main__":
    main()
