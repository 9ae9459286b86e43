"""What a cached result costs: Redis round trips against cache hits and misses through the engine.

In one run, against the local Redis (``127.0.0.1:6379``, a high database, a namespace of its own
that is deleted at the end), prints the median cost per call of:

- a plain redis-py ``GET`` and ``SET`` on the backend's own client (one round trip each);
- a cache hit ``t(x)`` and a cache miss that writes (``refresh_cache=True``, and distinct
  inputs) through the engine, on the Redis result backend;
- the same hit and miss on the in-memory store (an app without a result backend);
- a plain function call, as the baseline.

The last column is the engine's cost over the store work a call cannot avoid (for a Redis hit:
one ``GET``). No assertions: this is a measurement.

    python bench/cache_costs.py [--url redis://127.0.0.1:6379/14] [--calls 2000] [--repeats 7]
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

from celery_taskengine import task
from celery_taskengine.cache_policies import INPUTS
from celery_taskengine.redis_store import RedisStore
from celery_taskengine.result_store import store_for_app


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def median_us(fn: Callable[[], Any], calls: int, repeats: int) -> float:
    fn()  # warm up: connections, source text, code paths
    return statistics.median(per_call_us(fn, calls) for _ in range(repeats))


def make_tasks(app: Celery, prefix: str) -> tuple[Any, Any]:
    """A cached task and its always-refreshing twin (same name, so the same keys)."""

    @task(app=app, name=f"{prefix}.square", cache_policy=INPUTS)
    def square(x: int) -> dict[str, int]:
        return {"x": x, "square": x * x}

    return square, square.with_options(refresh_cache=True)


def plain_square(x: int) -> dict[str, int]:
    return {"x": x, "square": x * x}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--calls", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    calls, repeats = args.calls, args.repeats
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
    client.set(probe, b"x" * 300)  # about the size of a small record

    rows: list[tuple[str, float, float]] = []
    try:
        get_us = median_us(lambda: client.get(probe), calls, repeats)
        set_us = median_us(lambda: client.set(probe, b"x" * 300), calls, repeats)
        plain_us = median_us(lambda: plain_square(3), calls * 10, repeats)
        rows += [
            ("plain call square(3)", plain_us, 0.0),
            ("redis-py GET (one round trip)", get_us, get_us),
            ("redis-py SET (one round trip)", set_us, set_us),
        ]
        for label, app, floor_hit, floor_miss in (
            ("redis", redis_app, get_us, get_us + set_us),
            ("memory", memory_app, 0.0, 0.0),
        ):
            cached, refreshing = make_tasks(app, f"bench.{label}")
            cached(3)
            hit_us = median_us(lambda t=cached: t(3), calls, repeats)
            refresh_us = median_us(lambda t=refreshing: t(3), calls, repeats)
            fresh = itertools.count(1_000_000)
            miss_us = median_us(lambda t=cached, n=fresh: t(next(n)), calls, repeats)
            rows += [
                (f"{label}: cache hit t(3)", hit_us, floor_hit),
                (f"{label}: miss + write, refresh_cache", refresh_us, set_us if floor_miss else 0),
                (f"{label}: miss + write, new inputs", miss_us, floor_miss),
            ]
    finally:
        names = list(client.scan_iter(match=f"cte:{namespace}:*", count=1000))
        for offset in range(0, len(names), 1000):
            client.delete(*names[offset : offset + 1000])
        redis_app.close()
        memory_app.close()

    print(f"{'what':<42} {'µs/call':>9} {'store floor':>12} {'engine µs':>10}")
    for name, value, floor in rows:
        engine = value - floor - (plain_us if "cache" in name or "miss" in name else 0.0)
        print(f"{name:<42} {value:>9.1f} {floor:>12.1f} {engine:>10.1f}")
    print(
        f"\nhit minus one GET: {rows[3][1] - get_us:.1f} µs "
        f"(target: at most 30 µs above one round trip)"
    )


if __name__ == "__main__":
    main()
