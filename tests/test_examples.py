"""``examples/``: each example runs as documented, against real workers on the test's Redis.

An example is a Celery app module and, run as ``python -m examples.<name>``, a producer. Each
test starts the worker(s) its docstring shows as subprocesses, runs the producer, checks what
it prints, and stops the workers (also when the test fails). ``SHOP_BROKER_URL`` and
``SHOP_BACKEND_URL`` point both at the test's own Redis database.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: Seconds a producer may take, worker start-up included.
PRODUCER_TIMEOUT = 90


def _die_with_parent() -> None:
    """In the child: get SIGTERM if pytest dies without running its teardown (Linux only)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


@pytest.fixture
def shop_env(redis_url: str) -> dict[str, str]:
    """The environment examples run in: both URLs on the test's database."""
    return {**os.environ, "SHOP_BROKER_URL": redis_url, "SHOP_BACKEND_URL": redis_url}


@contextlib.contextmanager
def workers(
    example: str, env: dict[str, str], logs: Path, *, count: int = 1, pool: str = "solo"
) -> Iterator[list[Path]]:
    """``count`` workers of ``examples.<example>``; yields their log files; always stops them."""
    procs: list[subprocess.Popen[bytes]] = []
    paths = [logs / f"{example}-worker-{n}.log" for n in range(1, count + 1)]
    try:
        for n, path in enumerate(paths, start=1):
            command = [
                sys.executable, "-m", "celery", "-A", f"examples.{example}", "worker",
                f"--pool={pool}", "--concurrency=2", "-l", "info", "-n", f"w{n}-{example}@%h",
                "--without-mingle", "--without-gossip", "--without-heartbeat",
            ]  # fmt: skip
            with path.open("wb") as log:
                proc = subprocess.Popen(
                    command,
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent,
                )
            procs.append(proc)
        yield paths
    finally:
        for proc in procs:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def produce(example: str, env: dict[str, str], logs: list[Path]) -> str:
    """Run ``python -m examples.<example>``; its stdout, or a failure with the workers' logs."""
    done = subprocess.run(
        [sys.executable, "-m", f"examples.{example}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=PRODUCER_TIMEOUT,
    )
    if done.returncode != 0:
        tails = "\n".join(f"--- {p.name}\n{_tail(p)}" for p in logs)
        pytest.fail(f"producer exited {done.returncode}:\n{done.stderr}\n{tails}", pytrace=False)
    return done.stdout


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# -- embedded: no Redis --------------------------------------------------------------------


def test_quickstart_runs_without_redis_and_prints_each_runs_timeline() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOP_")}
    done = subprocess.run(
        [sys.executable, "examples/quickstart.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=PRODUCER_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    for title in ("a retry with backoff", "a cache hit", "a timeout"):
        assert title in done.stdout
    for state in ("AwaitingRetry", "Retrying", "Cached", "TimedOut"):
        assert re.search(rf"\b{state}\b", done.stdout), state
    assert done.stdout.rstrip().endswith("done")


# -- with workers on Redis -----------------------------------------------------------------


def test_shop_fetches_invoices_in_a_worker_and_serves_a_repeat_from_the_cache(
    shop_env: dict[str, str], tmp_path: Path
) -> None:
    with workers("shop", shop_env, tmp_path) as logs:
        out = produce("shop", shop_env, logs)
    lines = out.splitlines()
    assert len(lines) == 3, out
    assert lines[0].startswith("inv-42: {'id': 'inv-42', 'total': ")
    assert lines[0].endswith("[Pending -> Running -> Completed]")
    assert lines[1].split("  [")[0] == lines[0].split("  [")[0]
    assert lines[1].endswith("Cached]")
    assert lines[2].startswith("inv-7: ") and lines[2].endswith("Completed]")

    # And the runs are there for the CLI to list, from yet another process
    listing = subprocess.run(
        [sys.executable, "-m", "celery_taskengine", "-A", "examples.shop", "runs", "ls"],
        cwd=REPO,
        env=shop_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listing.returncode == 0, listing.stderr
    rows = listing.stdout.splitlines()[1:]
    assert sorted(row.split()[2] for row in rows) == ["Cached", "Completed", "Completed"]


def test_hooks_run_in_the_worker_and_post_to_the_audit_log(
    shop_env: dict[str, str], tmp_path: Path
) -> None:
    with workers("hooks", shop_env, tmp_path) as logs:
        out = produce("hooks", shop_env, logs)
    audit = out.split("audit log:\n", 1)[1].splitlines()
    assert [line.strip() for line in audit] == [
        "order-1: Running (attempt 1)",
        "order-1: shipped",
        "order-2: Running (attempt 1)",
        "order-2: Retrying (attempt 2)",
        "order-2: FAILED, Task run encountered an exception ValueError: order order-2 has no "
        "address",
    ]
    assert "order-2 raised ValueError: order order-2 has no address" in out


def test_a_chord_whose_header_tasks_retry_still_calls_its_callback(
    shop_env: dict[str, str], tmp_path: Path
) -> None:
    with workers("chord", shop_env, tmp_path) as logs:
        out = produce("chord", shop_env, logs)
    assert "order total: 61.2" in out
    for sku in ("mug", "shirt", "poster"):
        assert f"{sku}: Pending -> Running -> AwaitingRetry -> Retrying -> Completed" in out


def test_serializable_caching_executes_once_across_two_workers(
    shop_env: dict[str, str], tmp_path: Path
) -> None:
    with workers("caching", shop_env, tmp_path, count=2, pool="threads") as logs:
        out = produce("caching", shop_env, logs)
    assert "identical values: True" in out
    assert "runs: {'Cached': 3, 'Completed': 1}" in out
    assert "executed: 1 time(s)" in out


def test_a_delayed_retry_leaves_the_worker_free_for_other_tasks(
    shop_env: dict[str, str], tmp_path: Path
) -> None:
    # One solo worker: only if the retry waits on the broker can the receipt run meanwhile
    with workers("retries", shop_env, tmp_path) as logs:
        out = produce("retries", shop_env, logs)
    assert "charge: charged order-1" in out
    assert "charge history: Pending -> Running -> AwaitingRetry -> Retrying -> Completed" in out
    assert "the worker was free during the wait" in out


def test_async_tasks_run_in_the_worker_on_one_event_loop(
    shop_env: dict[str, str], tmp_path: Path
) -> None:
    with workers("async_tasks", shop_env, tmp_path) as logs:
        out = produce("async_tasks", shop_env, logs)
    assert "mug: in stock = False" in out
    assert "shirt: in stock = False" in out
    assert "poster: in stock = True" in out
    assert "event loops used: 1" in out


def test_a_generator_tasks_items_are_streamed_while_it_runs(
    shop_env: dict[str, str], tmp_path: Path
) -> None:
    with workers("streaming", shop_env, tmp_path) as logs:
        out = produce("streaming", shop_env, logs)
    arrivals = [float(t) for t in re.findall(r"^\s*([\d.]+) s  got order \d+$", out, re.M)]
    assert len(arrivals) == 5, out
    # Items come 0.3 s apart as yielded, not all at once at the end
    assert arrivals[-1] - arrivals[0] >= 0.8, arrivals
    assert "all rows: 5" in out
