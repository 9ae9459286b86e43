"""Processes the reliability tests start and kill for real, and the checks they share.

- :class:`RedisServer`: a ``redis-server`` of the test's own, on a fixed port, that can be
  restarted (with its data: append-only file, so a restart is an outage, not a wipe).
- :class:`WorkerProcess`: ``celery -A tests.reliability.worker_app worker`` in a session of its
  own, so the whole worker (main process and pool children) can be SIGKILLed at once; its
  output goes to a log file the test can read.

Every process is stopped and waited for by its context manager, also when a test fails.
Waits are bounded and fail with a message saying what never happened; nothing asserts on
elapsed time.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kombu.exceptions
import redis
from celery import Celery

from celery_taskengine import get_task_run
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine.states import TRANSITIONS, StateType
from tests.conftest import _answers_ping, _die_with_parent, _free_port, skip_or_fail

ROOT = Path(__file__).resolve().parents[2]
#: Seconds a worker has to answer its first ping.
READY_TIMEOUT = 60.0


def wait_for(condition: Callable[[], Any], timeout: float, what: str, poll: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy, and return that.

    Fails with ``what`` after ``timeout`` seconds: a bound on a wait, not a timing assertion.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(poll)


# -- Redis -------------------------------------------------------------------------------------


class RedisServer:
    """A private ``redis-server`` that can be stopped and started again on the same port."""

    def __init__(self, workdir: Path, *, args: tuple[str, ...] = ()) -> None:
        """``args``: more ``redis-server`` options, e.g. ``("--replicaof", host, port)``."""
        binary = shutil.which("redis-server")
        if binary is None:
            skip_or_fail("redis-server is not on PATH")
        self.binary = binary
        self.workdir = workdir
        self.port = _free_port()
        self.log = workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.args = args

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--dir", str(self.workdir),
            *self.args,
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
        wait_for(
            lambda: self._check_alive() and _answers_ping(self.port), 20, "redis-server to start"
        )

    def stop(self) -> None:
        """SIGTERM (Redis flushes its append-only file and exits), then wait."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()
        self.restarts += 1

    def _check_alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited: {self.log.read_text(errors='replace')}")
        return True


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- workers -----------------------------------------------------------------------------------

_names = itertools.count(1)


class WorkerProcess:
    """One ``celery worker`` subprocess of ``app_module`` (``tests.reliability.worker_app``)."""

    def __init__(
        self,
        app: Celery,
        logdir: Path,
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        env: dict[str, str] | None = None,
        loglevel: str = "info",
        queues: str | None = None,
        app_module: str = "tests.reliability.worker_app",
    ) -> None:
        self.app = app
        self.app_module = app_module
        self.pool = pool
        self.concurrency = concurrency
        self.extra_env = env or {}
        self.loglevel = loglevel
        self.queues = queues or app.conf.task_default_queue
        self.name = f"rel{next(_names)}-{uuid.uuid4().hex[:6]}@localhost"
        self.log = logdir / f"{self.name.split('@')[0]}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        #: Exit codes of the times the worker exited by itself (see restart_if_exited).
        self.exits: list[int] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the worker is not running"
        return self.proc.pid

    def start(self, *, wait: bool = True) -> WorkerProcess:
        conf = self.app.conf
        visibility = conf.broker_transport_options.get("visibility_timeout")
        env = {
            **os.environ,
            "RELIABILITY_BROKER_URL": conf.broker_url,
            "RELIABILITY_BACKEND_URL": conf.result_backend,
            "RELIABILITY_QUEUE": conf.task_default_queue,
            "RELIABILITY_VISIBILITY_TIMEOUT": str(visibility),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **self.extra_env,
        }
        command = [
            sys.executable, "-m", "celery", "-A", self.app_module, "worker",
            f"--pool={self.pool}", "-c", str(self.concurrency), "-l", self.loglevel,
            "-Q", self.queues, "-n", self.name,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        with self.log.open("ab") as out:
            out.write(f"\n==== start {self.starts + 1} ====\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                command,
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killpg takes the whole worker
            )
        self.starts += 1
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        def answers() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited during start-up:\n{self.tail()}")
            try:
                # A connection of its own: the app's pooled ones may be dead after an outage.
                with self.app.connection_for_write() as connection:
                    replies = self.app.control.ping(
                        destination=[self.name], timeout=0.5, connection=connection
                    )
            except (OSError, redis.exceptions.ConnectionError, kombu.exceptions.OperationalError):
                return False
            return bool(replies) and (self.pool != "prefork" or len(self.children()) > 0)

        wait_for(answers, READY_TIMEOUT, f"worker {self.name} to answer a ping", poll=0.1)

    def restart_if_exited(self) -> bool:
        """Start the worker again if it exited by itself, as a process supervisor would."""
        if self.proc is None or self.proc.poll() is None:
            return False
        self.exits.append(self.proc.returncode)
        self.kill()  # its pool processes, if any are left
        self.start()
        return True

    def children(self) -> list[int]:
        """The pool processes of a prefork worker."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def kill_child(self, pid: int) -> bool:
        """SIGKILL one pool process; ``False`` if it was already gone."""
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool) and wait for the main process."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
        # Pool processes are in the group too; they are reaped by init once the main is gone.
        wait_for(lambda: not _group_alive(proc.pid), 20, f"worker {self.name}'s pool to die")

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL for whatever is left."""
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)  # in case a test stopped it
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
        self.kill()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies of the group count as dead: nobody runs in them.
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@contextlib.contextmanager
def workers(*procs: WorkerProcess) -> Iterator[tuple[WorkerProcess, ...]]:
    """Start ``procs`` and stop every one of them at the end, whatever happens."""
    try:
        for proc in procs:
            proc.start()
        yield procs
    finally:
        for proc in procs:
            proc.stop()


# -- checks -----------------------------------------------------------------------------------


def load_run(app: Celery, task_id: str) -> TaskRun | None:
    return get_task_run(task_id, app=app)


def history_problems(run: TaskRun | None, task_id: str) -> list[str]:
    """What is wrong with a finished run's record: missing, not final, illegal transitions."""
    if run is None:
        return [f"{task_id}: no run record"]
    names = run.history_names()
    problems = []
    states = run.state_history
    if not states or states[0].name != "Pending":
        problems.append(f"{task_id}: history does not start with Pending: {names}")
    for before, after in itertools.pairwise(states):
        if after.type not in TRANSITIONS[before.type]:
            problems.append(f"{task_id}: illegal {before.name} -> {after.name} in {names}")
    if run.state is None or not run.state.is_final() or run.state.type is StateType.CRASHED:
        problems.append(f"{task_id}: not finished: {names}")
    return problems


@dataclass(frozen=True)
class DeliveryLog:
    """The deliveries the workers logged (see ``worker_app._log_delivery``)."""

    starts: list[tuple[str, int, bool, int]]  #: (task id, Celery retries, redelivered, pid)
    ends: list[tuple[str, str, int]]  #: (task id, Celery state, pid)

    def started(self, task_id: str) -> list[tuple[str, int, bool, int]]:
        return [row for row in self.starts if row[0] == task_id]

    def ended(self, task_id: str) -> list[tuple[str, str, int]]:
        return [row for row in self.ends if row[0] == task_id]


def deliveries(app: Celery) -> DeliveryLog:
    from tests.reliability.worker_app import DELIVERIES, side

    log = DeliveryLog([], [])
    for raw in side(app).lrange(DELIVERIES, 0, -1):
        kind, task_id, *rest = raw.decode().split()
        if kind == "start":
            retries, redelivered, pid = rest
            log.starts.append((task_id, int(retries), redelivered == "1", int(pid)))
        else:
            state, pid = rest
            log.ends.append((task_id, state, int(pid)))
    return log


def counter(app: Celery, name: str) -> int:
    from tests.reliability.worker_app import side

    value = side(app).get(name)
    return int(value) if value is not None else 0


#: The result backends the claim tests run over: Redis (the broker's server), and databases
#: (the engine's store derived from them), the broker staying Redis.
STORE_KINDS = ["redis", "postgresql", "mariadb", "sqlite"]
_DATABASES = {
    "postgresql": "db+postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "mariadb": "db+mysql+pymysql://root@127.0.0.1:3306/test",
}


def result_backend(kind: str, redis_url: str, workdir: Path) -> str:
    """The result backend URL of a ``STORE_KINDS`` entry (a database must answer)."""
    if kind == "redis":
        return redis_url
    if kind == "sqlite":
        return f"db+sqlite:///{workdir / 'results.db'}"
    url = _DATABASES[kind]
    from sqlalchemy import create_engine, text

    engine = create_engine(url.removeprefix("db+"))
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # the server is not there: a gap in CI, a skip on a laptop
        skip_or_fail(f"cannot reach {kind}: {type(exc).__name__}: {exc}")
    finally:
        engine.dispose()
    return url


def claim_holder(app: Celery, task_id: str, attempt: int = 0) -> str | None:
    """Who holds the claim on ``task_id``'s message ``attempt`` in the app's store."""
    from celery_taskengine._store.redis_store import RedisStore
    from celery_taskengine._store.selection import store_for_app

    store: Any = store_for_app(app)
    if isinstance(store, RedisStore):
        value = store.client.get(f"cte:default:claim:{task_id}:{attempt}")
        return None if value is None else str(value.decode())
    holder: str | None = store.claim_holder(task_id, attempt)
    return holder


@contextlib.contextmanager
def reliability_app(
    url: str, *, prefix: str = "rel", **options: Any
) -> Iterator[tuple[Celery, Any]]:
    """The reliability tasks' app on ``url``, with a queue of its own; closed afterwards."""
    from tests.reliability.worker_app import make_app  # module import builds a default app

    app, tasks = make_app(url, queue=f"{prefix}-{uuid.uuid4().hex[:8]}", **options)
    try:
        yield app, tasks
    finally:
        app.close()


def outcome_of(result: Any, timeout: float) -> Any:
    """What ``result.get()`` gave: the value, or the exception it raised."""
    try:
        return result.get(timeout=timeout)
    except Exception as exc:  # the run's own exception, whatever it is
        return exc
