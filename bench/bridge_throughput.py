"""Plain Celery tasks against engine tasks, on the same Redis and the same worker, in one run.

Starts a private redis-server and a real ``celery worker`` (prefork, 2 processes), then
measures for each kind: throughput of N no-op tasks (send all, then wait for all) and the
median round trip of M sequential ``.delay().get()``; and the round trip of a producer-side
cache hit. Prints a table with ratios to plain Celery. No assertions: it is a measurement.
``--backend`` puts both kinds' results on another backend (a database: the engine's store is
then the SQL store on it; the private Redis stays the broker).

    python bench/bridge_throughput.py [--tasks 2000] [--round-trips 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def private_redis() -> Iterator[str]:
    port = free_port()
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


@contextmanager
def worker(env: dict[str, str], pool: str) -> Iterator[None]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.bridge_app",
            "worker",
            f"--pool={pool}",
            "--concurrency=2",
            "-l",
            "warning",
            "--without-gossip",
            "--without-mingle",
        ],
        env=env,
        cwd=ROOT,
    )
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def throughput(send: Callable[[int], Any], count: int) -> float:
    start = time.perf_counter()
    wait_all([send(i) for i in range(count)])
    return count / (time.perf_counter() - start)


def wait_all(results: list[Any], timeout: float = 300.0) -> None:
    """Wait until every result is ready. On a database backend, one query counts the ready
    rows (Celery's ``.get()`` there opens a connection per result outside a worker, which
    would time the producer, not the worker); elsewhere, ``.get()`` each."""
    backend = results[0].backend
    if not hasattr(backend, "ResultSession"):
        for result in results:
            result.get(timeout=timeout)
        return
    from celery import states
    from celery.backends.database.models import Task

    ids = [result.id for result in results]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        session = backend.ResultSession()
        try:
            ready = Task.status.in_(list(states.READY_STATES))
            done = session.query(Task).filter(Task.task_id.in_(ids), ready).count()
        finally:
            session.close()
        if done == len(ids):
            return
        time.sleep(0.02)
    raise TimeoutError(f"{len(ids)} tasks not all ready in {timeout} s")


def round_trip_ms(send: Callable[[int], Any], count: int) -> float:
    samples = []
    for i in range(count):
        start = time.perf_counter()
        send(i).get(timeout=60, interval=0.005)  # a database backend is polled
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--round-trips", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--pool", default="prefork")
    parser.add_argument(
        "--backend",
        default=None,
        help="a result backend URL for both kinds (e.g. db+postgresql+psycopg://...); "
        "default: the private Redis",
    )
    args = parser.parse_args()
    with private_redis() as url:
        env = {
            **os.environ,
            "BENCH_BROKER_URL": f"{url}/0",
            "BENCH_BACKEND_URL": args.backend or f"{url}/1",
            "PYTHONPATH": str(ROOT),
        }
        os.environ.update(env)
        sys.path.insert(0, str(ROOT))
        from bench import bridge_app

        with worker(env, args.pool):
            bridge_app.app.control.ping(timeout=10)
            for _ in range(50):  # warm-up both paths
                bridge_app.plain_noop.delay(0).get(timeout=60, interval=0.005)
                bridge_app.engine_noop.delay(0).get(timeout=60, interval=0.005)
            report(bridge_app, args)
            commands_per_task(bridge_app, url)


def commands_per_task(app_module: Any, url: str, count: int = 200) -> None:
    """Redis commands the server ran per task of each kind (producer and worker together):
    a count, free of the shared machine's noise, of what each kind asks of Redis."""
    import redis

    client = redis.Redis.from_url(url)

    def calls() -> int:
        stats = client.info("commandstats")
        return sum(int(v["calls"]) for v in stats.values())

    kinds = {
        "plain Celery": app_module.plain_noop.delay,
        "engine": app_module.engine_noop.delay,
    }
    for label, send in kinds.items():
        before = calls()
        wait_all([send(i) for i in range(count)])
        per_task = (calls() - before - 1) / count  # the INFO call itself counts once
        print(f"Redis commands per task, {label}: {per_task:.1f}")
    client.close()


def report(app_module: Any, args: argparse.Namespace) -> None:
    plain, engine = app_module.plain_noop.delay, app_module.engine_noop.delay
    rows: dict[str, list[float]] = {k: [] for k in ("pt", "et", "pr", "er", "cr", "tr", "rr")}
    app_module.engine_cached.delay(7).get(timeout=60, interval=0.005)  # commit the record once
    for repeat in range(args.repeats):
        # Alternate which kind goes first, and compare each pair measured back to back: a
        # shared machine drifts, and whichever runs first would otherwise be favoured.
        order = ("plain", "engine") if repeat % 2 == 0 else ("engine", "plain")
        for kind in order:
            key = "pt" if kind == "plain" else "et"
            rows[key].append(throughput(plain if kind == "plain" else engine, args.tasks))
        for kind in order:
            key = "pr" if kind == "plain" else "er"
            rows[key].append(round_trip_ms(plain if kind == "plain" else engine, args.round_trips))
        rows["tr"].append(rows["et"][-1] / rows["pt"][-1])
        rows["rr"].append(rows["er"][-1] / rows["pr"][-1])
        rows["cr"].append(
            round_trip_ms(lambda i: app_module.engine_cached.delay(7), args.round_trips)
        )
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(
        f"pool={args.pool}, {args.tasks} tasks, {args.round_trips} round trips, "
        f"median of {args.repeats} (ratios: median of back-to-back pairs, order alternated)"
    )
    print(f"{'what':<40} {'value':>10} {'vs plain':>9}")
    print(f"{'plain Celery throughput (tasks/s)':<40} {med['pt']:>10.0f} {1.0:>9.2f}")
    print(f"{'engine throughput (tasks/s)':<40} {med['et']:>10.0f} {med['tr']:>9.2f}")
    print(f"{'plain Celery round trip (ms)':<40} {med['pr']:>10.2f} {1.0:>9.2f}")
    print(f"{'engine round trip (ms)':<40} {med['er']:>10.2f} {med['rr']:>9.2f}")
    print(f"{'producer-side cache hit (ms)':<40} {med['cr']:>10.2f} {med['cr'] / med['pr']:>9.2f}")
    print(f"throughput ratios per pair: {', '.join(f'{r:.2f}' for r in rows['tr'])}")
    print(f"cache hit is {med['pr'] / med['cr']:.1f}x faster than a plain Celery round trip")


if __name__ == "__main__":
    main()
