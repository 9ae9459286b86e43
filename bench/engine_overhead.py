"""Engine overhead per local run, against a plain function call measured in the same run.

Prints a table of medians (µs per call) for: a plain call, ``run_task_sync(t, parameters=...)``,
``t(...)``; and the async equivalents on one running event loop. The engine overhead is the
difference to the plain call. No assertions: this is a measurement, not a test.

    python bench/engine_overhead.py [--calls 20000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from celery import Celery

from celery_taskengine import task
from celery_taskengine.task_engine import run_task_async, run_task_sync

app = Celery("bench-engine", set_as_current=False)  # no result backend: in-memory store


def add(x: int, y: int) -> int:
    return x + y


async def add_async(x: int, y: int) -> int:
    return x + y


add_task = task(app=app, name="bench.add")(add)
add_async_task = task(app=app, name="bench.add_async")(add_async)


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


async def per_call_us_async(fn: Callable[[], Awaitable[Any]], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        await fn()
    return (time.perf_counter() - start) / calls * 1e6


def median_of(repeats: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    calls, repeats = args.calls, args.repeats
    params = {"x": 1, "y": 2}

    rows: list[tuple[str, float, float]] = []
    plain = median_of(repeats, lambda: per_call_us(lambda: add(1, 2), calls))
    rows.append(("plain call add(1, 2)", plain, plain))
    via_runner = median_of(
        repeats, lambda: per_call_us(lambda: run_task_sync(add_task, parameters=params), calls)
    )
    rows.append(("run_task_sync(t, parameters=...)", via_runner, plain))
    via_call = median_of(repeats, lambda: per_call_us(lambda: add_task(1, 2), calls))
    rows.append(("t(1, 2)", via_call, plain))

    async def async_rows() -> None:
        base = statistics.median(
            [await per_call_us_async(lambda: add_async(1, 2), calls) for _ in range(repeats)]
        )
        rows.append(("plain await add_async(1, 2)", base, base))
        runner = statistics.median(
            [
                await per_call_us_async(
                    lambda: run_task_async(add_async_task, parameters=params), calls
                )
                for _ in range(repeats)
            ]
        )
        rows.append(("await run_task_async(t, parameters=...)", runner, base))
        called = statistics.median(
            [await per_call_us_async(lambda: add_async_task(1, 2), calls) for _ in range(repeats)]
        )
        rows.append(("await t(1, 2)", called, base))

    asyncio.run(async_rows())

    print(f"{'what':<42} {'µs/call':>9} {'overhead µs':>12}")
    for name, value, base in rows:
        print(f"{name:<42} {value:>9.2f} {value - base:>12.2f}")


if __name__ == "__main__":
    main()
