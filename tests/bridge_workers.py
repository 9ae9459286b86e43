"""Real Celery workers for the bridge tests: in-process and ``celery worker`` subprocesses.

Every worker stops when its context exits, also when a test fails: in-process workers through
``start_worker``'s own context (see :func:`tests.workers.embedded_worker`), subprocesses with
SIGTERM, then SIGKILL for them and their pool processes.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from celery import Celery

from tests import bridge_app
from tests.conftest import skip_or_fail
from tests.workers import embedded_worker

ROOT = Path(__file__).resolve().parent.parent
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
#: Seconds a worker has to answer its first task.
READY_TIMEOUT = 30.0


@dataclass
class Worker:
    """A running worker and what tests need to talk to it."""

    app: Celery
    tasks: SimpleNamespace
    queue: str
    pool: str
    pid: int | None = None  # a subprocess worker's main process

    def key(self, name: str) -> str:
        """A Redis key unique to one test."""
        return f"test:{name}:{uuid.uuid4().hex}"


def broker_url(kind: str, redis_url: str) -> str:
    """The broker URL for ``kind`` (``redis`` or ``amqp``); skips (fails in CI) if unreachable."""
    if kind == "redis":
        return redis_url
    if not _reachable("127.0.0.1", 5672):
        skip_or_fail("RabbitMQ is not reachable on 127.0.0.1:5672")
    return RABBITMQ_URL


@contextlib.contextmanager
def in_process_worker(
    broker: str, backend: str, *, pool: str = "solo", concurrency: int = 1
) -> Iterator[Worker]:
    """``start_worker`` on a fresh app and queue; the queue is deleted afterwards."""
    queue = _new_queue()
    app, tasks = bridge_app.make_app(broker, backend, queue)
    try:
        with _no_tracebacks_in_worker_threads(), embedded_worker(app, pool, concurrency):
            worker = Worker(app, tasks, queue, pool)
            wait_until_serving(worker)
            yield worker
    finally:
        _release(app, queue)


@contextlib.contextmanager
def _no_tracebacks_in_worker_threads() -> Iterator[None]:
    """Keep Celery from formatting tracebacks of failed tasks in the worker's threads.

    Python 3.11 formats tracebacks with ``ast.parse`` (for the ``^^^`` markers), and its AST
    converter keeps state per interpreter, not per thread: a worker thread logging a failure
    while the main thread parses (pytest importing a module) can raise
    ``SystemError: AST constructor recursion depth mismatch`` in either (fixed in 3.12).
    The tests read failures from results, not logs.
    """
    trace_logger = logging.getLogger("celery.app.trace")
    saved = trace_logger.level
    trace_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        trace_logger.setLevel(saved)


@contextlib.contextmanager
def subprocess_worker(
    broker: str, backend: str, *, pool: str = "prefork", concurrency: int = 2
) -> Iterator[Worker]:
    """``celery -A tests.bridge_app worker -E`` in a subprocess, stopped (killed if need be)."""
    queue = _new_queue()
    app, tasks = bridge_app.make_app(broker, backend, queue)
    env = {
        **os.environ,
        "BRIDGE_BROKER_URL": broker,
        "BRIDGE_BACKEND_URL": backend,
        "BRIDGE_QUEUE": queue,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable, "-m", "celery", "-A", "tests.bridge_app", "worker",
        f"--pool={pool}", "-c", str(concurrency), "-l", "warning", "-E",
        "--without-gossip", "--without-mingle", "-n", f"{queue}@%h",
    ]  # fmt: skip
    proc = subprocess.Popen(command, env=env, cwd=ROOT)
    try:
        worker = Worker(app, tasks, queue, pool, pid=proc.pid)
        wait_until_serving(worker, proc)
        yield worker
    finally:
        _stop(proc)
        _release(app, queue)


def wait_until_serving(worker: Worker, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until the worker has run a probe task (its consumer, pool and backend work)."""
    result = worker.tasks.probe.delay()
    deadline = time.monotonic() + READY_TIMEOUT
    while not result.ready():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode} before serving")
        if time.monotonic() > deadline:
            raise RuntimeError("worker did not serve a probe task in time")
        time.sleep(0.05)
    assert result.get(timeout=1) == "ok"


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def child_pids(pid: int) -> list[int]:
    """The children of process ``pid`` (a prefork worker's pool processes)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class EventRecorder:
    """Collects every task event from the broker on a thread while its context is open."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.events: list[dict[str, Any]] = []
        self._receiver: Any = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-recorder", daemon=True)

    def __enter__(self) -> EventRecorder:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the event receiver did not start")
        self._wait_until_receiving()
        return self

    def _wait_until_receiving(self) -> None:
        """Redis delivers events to current subscribers only: wait until a probe comes back."""
        marker = uuid.uuid4().hex
        deadline = time.monotonic() + 10
        while not self.of(marker):
            if time.monotonic() > deadline:
                raise RuntimeError("the event receiver never saw its probe event")
            with self.app.events.default_dispatcher() as dispatcher:
                dispatcher.send("task-probe", uuid=marker)
            time.sleep(0.1)

    def __exit__(self, *exc_info: object) -> None:
        self._receiver.should_stop = True
        self._thread.join(10)

    def of(self, task_id: str) -> list[dict[str, Any]]:
        return [event for event in list(self.events) if event.get("uuid") == task_id]

    def types_of(self, task_id: str) -> list[str]:
        return [event["type"] for event in self.of(task_id)]

    def _run(self) -> None:
        with self.app.connection_for_read() as connection:
            receiver = self.app.events.Receiver(
                connection, handlers={"*": self.events.append}, queue_prefix="cte-test-ev"
            )
            self._receiver = receiver
            ready = receiver.on_consume_ready

            def on_consume_ready(*args: Any, **kwargs: Any) -> None:
                ready(*args, **kwargs)
                self._ready.set()

            receiver.on_consume_ready = on_consume_ready
            receiver.capture(limit=None, timeout=None, wakeup=False)


def _new_queue() -> str:
    return f"cte-bridge-{uuid.uuid4().hex[:10]}"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        children = child_pids(proc.pid)
        proc.kill()
        proc.wait(timeout=10)
        for child in children:  # pool processes their killed parent cannot stop any more
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def _release(app: Celery, queue: str) -> None:
    """Delete the test queue and let the tests' results go while Redis still answers.

    An ``AsyncResult`` sits in a reference cycle; collected later (after the session's Redis
    stopped) its ``__del__`` fails to unsubscribe, and the traceback pytest then formats in
    the middle of whatever the garbage collector interrupted can break Python 3.11's parser
    (``SystemError: AST constructor recursion depth mismatch``).
    """
    with contextlib.suppress(Exception), app.connection_for_write() as connection:
        connection.default_channel.queue_delete(queue)
    gc.collect()
    app.close()


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False
