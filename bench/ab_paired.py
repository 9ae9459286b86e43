"""Local engine costs in two checkouts, measured in pairs: a before/after comparison in one run.

One process per checkout (``<tree>/.venv/bin/python`` running this file with ``--serve``, so
each imports its own ``celery_taskengine``) stays up for the whole run. The controller asks
them in turn for one slice of calls of a case (A then B, then B then A, ...) and reads back
the CPU time per call of the serving thread (``time.thread_time``): a slice the machine took
away from one side costs it no CPU time, so a busy machine disturbs the pairs far less than
wall-clock figures. Printed per case: each side's minimum and median, and the median of the
per-pair ratios B/A. A Redis hit's engine-side cost is its figure minus the GET's (the
wait for Redis' answer costs no CPU time). Redis cases use ``127.0.0.1:6379/14`` under a
namespace of their own, deleted at the end. No assertions: this is a measurement.

    python bench/ab_paired.py --before ../wt-before --after . [--rounds 40] [--calls 500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

CASES = (
    "run_task_sync(t, parameters=...)",
    "t(1, 2)",
    "await run_task_async(t, parameters=...)",
    "await t(1, 2)",
    "memory: cache hit t(1, 2)",
    "redis: cache hit t(1, 2)",
    "redis: cache hit, no run records",
    "redis-py GET (the hit's one read)",
    "redis: miss + write, no run records",
)
REDIS_URL = "redis://127.0.0.1:6379/14"


def add(x: int, y: int) -> int:
    return x + y


async def add_async(x: int, y: int) -> int:
    return x + y


def serve() -> None:
    """Answer ``<case index> <calls>`` lines with the CPU µs per call, until stdin closes."""
    from celery import Celery

    from celery_taskengine import flush_run_records, task
    from celery_taskengine._engine.observers import NO_OBSERVERS
    from celery_taskengine.cache_policies import INPUTS
    from celery_taskengine.task_engine import local_environment, run_task_async, run_task_sync

    namespace = f"ab-{os.getpid()}"
    memory_app = Celery("ab-memory", set_as_current=False)
    redis_app = Celery("ab-redis", set_as_current=False)
    redis_app.conf.update(
        broker_url=REDIS_URL, result_backend=REDIS_URL, taskengine_namespace=namespace
    )
    plain = task(app=memory_app, name="ab.add")(add)
    plain_async = task(app=memory_app, name="ab.add_async")(add_async)
    memory_hit = task(app=memory_app, name="ab.memory", cache_policy=INPUTS)(add)
    redis_hit = task(app=redis_app, name="ab.redis", cache_policy=INPUTS)(add)
    quiet_hit = redis_hit.with_options()
    local_environment(quiet_hit, None).observers = NO_OBSERVERS
    quiet_miss = redis_hit.with_options(refresh_cache=True)
    local_environment(quiet_miss, None).observers = NO_OBSERVERS
    params = {"x": 1, "y": 2}
    client = redis_app.backend.client
    probe = f"cte:{namespace}:probe"
    client.set(probe, b"x" * 240)
    calls: list[Callable[[], Any]] = [
        lambda: run_task_sync(plain, parameters=params),
        lambda: plain(1, 2),
        lambda: run_task_async(plain_async, parameters=params),
        lambda: plain_async(1, 2),
        lambda: memory_hit(1, 2),
        lambda: redis_hit(1, 2),
        lambda: quiet_hit(1, 2),
        lambda: client.get(probe),
        lambda: quiet_miss(1, 2),
    ]
    loop = asyncio.new_event_loop()
    for index, call in enumerate(calls):
        _ = loop.run_until_complete(call()) if index in (2, 3) else call()  # warm, and cache
    try:
        for line in sys.stdin:
            index, count = map(int, line.split())
            if index in (2, 3):
                spent = loop.run_until_complete(_slice_async(calls[index], count))
            else:
                spent = _slice(calls[index], count)
            print(spent / count * 1e6, flush=True)
    finally:
        flush_run_records()
        names = list(client.scan_iter(match=f"cte:{namespace}:*", count=1000))
        if names:
            client.delete(*names)
        loop.close()


def _slice(call: Callable[[], Any], count: int) -> float:
    start = time.thread_time()
    for _ in range(count):
        call()
    return time.thread_time() - start


async def _slice_async(call: Callable[[], Awaitable[Any]], count: int) -> float:
    start = time.thread_time()
    for _ in range(count):
        await call()
    return time.thread_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--before", type=Path)
    parser.add_argument("--after", type=Path)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=500)
    options = parser.parse_args()
    if options.serve:
        serve()
        return
    if options.before is None or options.after is None:
        parser.error("--before and --after are required")
    trees = [options.before.resolve(), options.after.resolve()]
    sides = [_start(tree) for tree in trees]
    try:
        print(f"A (before): {trees[0]}\nB (after):  {trees[1]}")
        print(f"{options.rounds} pairs of {options.calls} calls per case, CPU µs per call\n")
        print(f"{'case':<42} {'A min':>7} {'B min':>7} {'A med':>7} {'B med':>7} {'B/A':>6}")
        for index, name in enumerate(CASES):
            a, b = _pairs(sides, index, options.rounds, options.calls)
            ratio = statistics.median(after / before for before, after in zip(a, b, strict=True))
            print(
                f"{name:<42} {min(a):>7.2f} {min(b):>7.2f} "
                f"{statistics.median(a):>7.2f} {statistics.median(b):>7.2f} {ratio:>6.3f}"
            )
    finally:
        for side in sides:
            assert side.stdin is not None
            side.stdin.close()
            side.wait(timeout=30)


def _start(tree: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(tree / ".venv" / "bin" / "python"), str(Path(__file__).resolve()), "--serve"],
        cwd=tree,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _pairs(
    sides: list[subprocess.Popen[str]], case: int, rounds: int, calls: int
) -> tuple[list[float], list[float]]:
    """``rounds`` slices of ``case`` on each side, the order flipped every round."""
    samples: tuple[list[float], list[float]] = ([], [])
    for round_ in range(rounds):
        for side in (0, 1) if round_ % 2 == 0 else (1, 0):
            process = sides[side]
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(f"{case} {calls}\n")
            process.stdin.flush()
            samples[side].append(float(process.stdout.readline()))
    return samples


if __name__ == "__main__":
    main()
