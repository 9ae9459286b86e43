"""Real Redis servers in the shapes deployments use: TLS, a password, ACL users, Sentinel.

Every server is a ``redis-server`` process of the test's own on a free port, stopped (and
waited for) when its context exits. TLS certificates are made with ``openssl`` for the test.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.conftest import _die_with_parent, _free_port, _stop, skip_or_fail

START_TIMEOUT = 10.0


@dataclass
class Server:
    """One running ``redis-server`` (or sentinel) and how to reach it."""

    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    password: str | None = None
    tls: dict[str, str] = field(default_factory=dict)

    def client(self, **kwargs: object) -> redis.Redis:
        options: dict[str, object] = {"password": self.password, **kwargs}
        if self.tls:
            options.update(
                ssl=True,
                ssl_ca_certs=self.tls["ca"],
                ssl_cert_reqs="required",
            )
        return redis.Redis(host="127.0.0.1", port=self.port, **options)  # type: ignore[arg-type]

    def alive(self) -> bool:
        return self.proc.poll() is None


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        skip_or_fail("redis-server is not on PATH")
    return binary


@contextlib.contextmanager
def redis_process(
    workdir: Path, *args: str, password: str | None = None, tls: dict[str, str] | None = None
) -> Iterator[Server]:
    """A ``redis-server`` with ``args`` on a free port; TLS-only when ``tls`` is given."""
    port = _free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"redis-{port}.log"
    listen = ["--port", str(port)]
    if tls:
        listen = [
            "--port", "0", "--tls-port", str(port), "--tls-cert-file", tls["cert"],
            "--tls-key-file", tls["key"], "--tls-ca-cert-file", tls["ca"],
            "--tls-auth-clients", "no",
        ]  # fmt: skip
    command = [
        _binary(), *listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(workdir), "--logfile", str(log), *args,
    ]  # fmt: skip
    if password:
        command += ["--requirepass", password]
    proc = subprocess.Popen(command, preexec_fn=_die_with_parent)
    server = Server(port, proc, log, password, dict(tls or {}))
    try:
        _wait_ping(server)
        yield server
    finally:
        _stop(proc)


def _wait_ping(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            if server.client(socket_timeout=1).ping():
                return
        except redis.RedisError:
            pass
        if not server.alive() or time.monotonic() > deadline:
            tail = server.log.read_text(errors="replace")[-2000:] if server.log.exists() else ""
            raise RuntimeError(f"redis-server on {server.port} did not answer:\n{tail}")
        time.sleep(0.05)


def make_certificates(workdir: Path) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1, made with ``openssl``."""
    if shutil.which("openssl") is None:
        skip_or_fail("openssl is not on PATH")
    workdir.mkdir(parents=True, exist_ok=True)
    ca, ca_key = workdir / "ca.crt", workdir / "ca.key"
    cert, key, csr = workdir / "server.crt", workdir / "server.key", workdir / "server.csr"
    ext = workdir / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run = [
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=cte-test-ca", "-keyout", str(ca_key), "-out", str(ca)],
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", str(key), "-out", str(csr)],
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert)],
    ]  # fmt: skip
    for command in run:
        subprocess.run(command, check=True, capture_output=True)
    return {"ca": str(ca), "cert": str(cert), "key": str(key)}


@dataclass
class SentinelSetup:
    """A master, a replica and a sentinel watching them as ``mymaster``."""

    master: Server
    replica: Server
    sentinel: Server

    @property
    def url(self) -> str:
        return f"sentinel://127.0.0.1:{self.sentinel.port}"

    def current_master_port(self) -> int:
        reply = self.sentinel.client().execute_command(
            "SENTINEL", "get-master-addr-by-name", "mymaster"
        )
        return int(reply[1])

    def master_is_served(self) -> bool:
        """Whether clients can find a healthy master through the sentinel (a failover is over:
        the address alone changes before the new master is reported healthy)."""
        import redis.sentinel

        sentinel = redis.sentinel.Sentinel([("127.0.0.1", self.sentinel.port)])
        try:
            sentinel.discover_master("mymaster")
        except redis.sentinel.MasterNotFoundError:
            return False
        finally:
            for client in sentinel.sentinels:
                client.close()
        return True


@contextlib.contextmanager
def sentinel_setup(workdir: Path) -> Iterator[SentinelSetup]:
    """Master, replica and one sentinel (quorum 1, a master down after 1 s fails over)."""
    with (
        redis_process(workdir / "master", "--appendonly", "yes") as master,
        redis_process(
            workdir / "replica", "--replicaof", "127.0.0.1", str(master.port),
            "--appendonly", "yes",
        ) as replica,
    ):  # fmt: skip
        config = workdir / "sentinel.conf"
        config.write_text(
            f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
            "sentinel down-after-milliseconds mymaster 1000\n"
            "sentinel failover-timeout mymaster 3000\n"
            "sentinel parallel-syncs mymaster 1\n"
        )
        port = _free_port()
        log = workdir / "sentinel.log"
        proc = subprocess.Popen(
            [_binary(), str(config), "--sentinel", "--port", str(port), "--bind", "127.0.0.1",
             "--logfile", str(log), "--dir", str(workdir)],
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        sentinel = Server(port, proc, log)
        try:
            _wait_ping(sentinel)
            setup = SentinelSetup(master, replica, sentinel)
            _wait_replica_in_sync(setup)
            yield setup
        finally:
            _stop(proc)


def _wait_replica_in_sync(setup: SentinelSetup) -> None:
    deadline = time.monotonic() + 20
    while True:
        info = setup.replica.client().info("replication")
        sentinel_knows = setup.sentinel.client().execute_command("SENTINEL", "replicas", "mymaster")
        if info.get("master_link_status") == "up" and sentinel_knows:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the replica never came in sync, or the sentinel never saw it")
        time.sleep(0.1)
