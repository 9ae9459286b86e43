"""The Redis faults the fault matrix injects into a result backend of its own, and their cures.

Each fault is a pair of steps the matrix takes while a batch of runs goes through: ``inject``
(mid-batch) and ``heal`` (a couple of seconds later, well inside Celery's backend retry
policy). The backend is a private ``redis-server`` (append-only, so a restart keeps what Redis
acknowledged); only the faults that need them get a replica or an ACL user:

``stop-kill-restart``
    SIGSTOP (writes hang mid-flight), then SIGKILL and a restart on the same port;
``client-kill``
    ``CLIENT KILL TYPE normal``: every client connection dropped at once;
``replicaof``
    the backend demoted to a replica of a second server (``REPLICAOF``, after that server
    caught up with it: no acknowledged write is lost), so writes fail with READONLY; then
    promoted back the same way;
``oom``
    ``maxmemory`` 1 byte with ``noeviction``: every write that may grow memory fails with OOM;
``noperm``
    the worker's ACL user may still read every key and write Celery's ``celery-*`` results,
    but no longer write the engine's ``cte:*`` keys: NOPERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from tests.reliability.harness import RedisServer, wait_for

#: The ACL user the worker's backend connections log in as (``noperm`` only).
ACL_USER = "matrix"
ACL_PASSWORD = "matrix-secret"
#: Seconds a step of a fault may take (a replica catching up, a restart).
STEP_TIMEOUT = 20.0


class Backend:
    """The faulted result backend: its server, a replica if the fault needs one, admin access."""

    def __init__(self, workdir: Path, *, with_replica: bool, with_acl_user: bool) -> None:
        self.primary = RedisServer(_mkdir(workdir / "primary"))
        self.replica: RedisServer | None = None
        self.with_replica = with_replica
        self.with_acl_user = with_acl_user
        self._workdir = workdir

    def start(self) -> None:
        self.primary.start()
        if self.with_acl_user:
            with self.admin() as admin:
                admin.execute_command("ACL", "SETUSER", ACL_USER, "on", f">{ACL_PASSWORD}",
                                      "~*", "&*", "+@all")  # fmt: skip
        if self.with_replica:
            args = ("--replicaof", "127.0.0.1", str(self.primary.port))
            self.replica = RedisServer(_mkdir(self._workdir / "replica"), args=args)
            self.replica.start()
            _wait_in_sync(self.primary, self.replica)

    def stop(self) -> None:
        for server in (self.replica, self.primary):
            if server is not None:
                _resume(server)
                server.stop()

    @property
    def url(self) -> str:
        """The backend for the test's own checks: the default user, database 0."""
        return f"{self.primary.url}/0"

    @property
    def worker_url(self) -> str:
        """The backend as the worker sees it: as the ACL user if the fault needs one."""
        if not self.with_acl_user:
            return self.url
        return f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{self.primary.port}/0"

    @contextlib.contextmanager
    def admin(self, server: RedisServer | None = None) -> Iterator[Any]:
        """A fresh connection of the default user to ``server`` (the primary by default)."""
        client = redis.Redis(port=(server or self.primary).port, socket_timeout=STEP_TIMEOUT)
        try:
            yield client
        finally:
            client.close()


@contextlib.contextmanager
def faulted_backend(fault: Fault, workdir: Path) -> Iterator[Backend]:
    backend = Backend(workdir, with_replica=fault.needs_replica, with_acl_user=fault.needs_acl)
    try:
        backend.start()
        yield backend
    finally:
        backend.stop()


@dataclass(frozen=True)
class Fault:
    name: str
    inject: Callable[[Backend], None]
    heal: Callable[[Backend], None]
    needs_replica: bool = False
    needs_acl: bool = False


# -- stop, kill, restart -----------------------------------------------------------------------


def _sigstop(backend: Backend) -> None:
    assert backend.primary.proc is not None
    os.kill(backend.primary.proc.pid, signal.SIGSTOP)


def _sigkill_and_restart(backend: Backend) -> None:
    server = backend.primary
    proc, server.proc = server.proc, None
    assert proc is not None
    proc.kill()  # SIGKILL reaches a stopped process too
    proc.wait(timeout=STEP_TIMEOUT)
    server.start()
    server.restarts += 1


def _resume(server: RedisServer) -> None:
    if server.proc is not None and server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)


# -- client kill -------------------------------------------------------------------------------


def _client_kill(backend: Backend) -> None:
    with backend.admin() as admin:
        admin.client_kill_filter(_type="normal")


def _nothing(backend: Backend) -> None:
    """Nothing to heal: the clients reconnect by themselves."""


# -- replica demotion --------------------------------------------------------------------------


def _demote(backend: Backend) -> None:
    assert backend.replica is not None
    _switch(backend, master=backend.primary, replica=backend.replica)


def _promote(backend: Backend) -> None:
    assert backend.replica is not None
    _switch(backend, master=backend.replica, replica=backend.primary)


def _switch(backend: Backend, *, master: RedisServer, replica: RedisServer) -> None:
    """Make ``replica`` the master and ``master`` its replica, losing no acknowledged write.

    What a manual failover does: pause writes on the master, let the replica catch up,
    ``REPLICAOF NO ONE`` on it, ``REPLICAOF`` on the old master, resume writes (which now fail
    with READONLY there).
    """
    with backend.admin(master) as old, backend.admin(replica) as new:
        old.execute_command("CLIENT", "PAUSE", int(STEP_TIMEOUT * 1000), "WRITE")
        try:
            _wait_in_sync(master, replica)
            new.execute_command("REPLICAOF", "NO", "ONE")
            old.execute_command("REPLICAOF", "127.0.0.1", replica.port)
        finally:
            old.execute_command("CLIENT", "UNPAUSE")
    _wait_in_sync(replica, master)


def _wait_in_sync(master: RedisServer, replica: RedisServer) -> None:
    def caught_up() -> bool:
        with contextlib.ExitStack() as stack:
            m = stack.enter_context(contextlib.closing(redis.Redis(port=master.port)))
            r = stack.enter_context(contextlib.closing(redis.Redis(port=replica.port)))
            ours, theirs = m.info("replication"), r.info("replication")
            return bool(
                theirs.get("master_link_status") == "up"
                and theirs.get("master_port") == master.port
                and theirs["master_repl_offset"] >= ours["master_repl_offset"]
            )

    wait_for(caught_up, STEP_TIMEOUT, f"redis :{replica.port} to catch up with :{master.port}")


# -- out of memory -----------------------------------------------------------------------------


def _fill_up(backend: Backend) -> None:
    with backend.admin() as admin:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)


def _free_up(backend: Backend) -> None:
    with backend.admin() as admin:
        admin.config_set("maxmemory", 0)


# -- no permission -----------------------------------------------------------------------------


def _forbid_engine_keys(backend: Backend) -> None:
    with backend.admin() as admin:
        admin.execute_command("ACL", "SETUSER", ACL_USER, "resetkeys", "%R~*", "~celery-*")


def _allow_every_key(backend: Backend) -> None:
    with backend.admin() as admin:
        admin.execute_command("ACL", "SETUSER", ACL_USER, "resetkeys", "~*")


FAULTS: dict[str, Fault] = {
    fault.name: fault
    for fault in (
        Fault("stop-kill-restart", _sigstop, _sigkill_and_restart),
        Fault("client-kill", _client_kill, _nothing),
        Fault("replicaof", _demote, _promote, needs_replica=True),
        Fault("oom", _fill_up, _free_up),
        Fault("noperm", _forbid_engine_keys, _allow_every_key, needs_acl=True),
    )
}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
