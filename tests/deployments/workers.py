"""``celery -A tests.deployments.worker_app worker`` subprocesses for the deployment tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

from celery import Celery

from tests.bridge_workers import child_pids
from tests.deployments import worker_app

ROOT = Path(__file__).resolve().parents[2]
#: Seconds a worker has to serve its first probe.
READY_TIMEOUT = 60.0


@contextlib.contextmanager
def deployment_worker(
    broker: str,
    backend: str,
    side: str,
    *,
    store: str | None = None,
    pool: str = "prefork",
    concurrency: int = 2,
    extra: tuple[str, ...] = (),
    wait: bool = True,
    backend_options: dict[str, Any] | None = None,
) -> Iterator[tuple[Celery, SimpleNamespace, subprocess.Popen[bytes]]]:
    """A worker on a queue of its own, and a producer app with the same configuration.

    The worker's output goes to a file (see :func:`worker_output`); the worker is stopped,
    its pool too, on exit.
    """
    queue = f"cte-deploy-{uuid.uuid4().hex[:10]}"
    app, tasks = worker_app.make_app(broker, backend, store, queue, side, backend_options)
    env = {
        **os.environ,
        "DEPLOY_BROKER": broker,
        "DEPLOY_BACKEND": backend,
        "DEPLOY_STORE": store or "",
        "DEPLOY_QUEUE": queue,
        "DEPLOY_SIDE": side,
        "DEPLOY_BACKEND_OPTIONS": json.dumps(backend_options or {}),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable, "-m", "celery", "-A", "tests.deployments.worker_app", "worker",
        f"--pool={pool}", "-c", str(concurrency), "-l", "warning", "-Q", queue,
        "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"{queue}@%h",
        *extra,
    ]  # fmt: skip
    # The worker's output goes to a file, not a pipe nobody reads while the test runs: a full
    # pipe would stall the worker on its next log line.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _logs[proc.pid] = log
        try:
            if wait:
                _wait_serving(tasks, proc)
            yield app, tasks, proc
        finally:
            _stop(proc)
            del _logs[proc.pid]
            app.close()


def _wait_serving(tasks: SimpleNamespace, proc: subprocess.Popen[bytes]) -> None:
    result = tasks.probe.delay()
    deadline = time.monotonic() + READY_TIMEOUT
    while not result.ready():
        if proc.poll() is not None:
            output = _output(proc)
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{output[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError("worker did not serve a probe task in time")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        children = child_pids(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def worker_output(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """Wait up to ``timeout`` seconds for the worker to exit by itself; its output."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the worker did not exit within {timeout:g} s") from exc
    return _output(proc)


#: Worker pid -> the file its output goes to.
_logs: dict[int, IO[bytes]] = {}


def _output(proc: subprocess.Popen[bytes]) -> str:
    """What the worker wrote so far."""
    log = _logs[proc.pid]
    log.seek(0)
    return log.read().decode(errors="replace")
