"""Fixtures shared by the whole suite: a private Redis server, a fresh database per test, and
Celery apps wired to it.

The Redis fixtures start their own ``redis-server`` on a free port, so tests never touch a
developer's Redis nor each other's data. Without a usable ``redis-server`` they skip on a
laptop but fail when ``CI`` is set: in CI a skipped integration test is a silent gap.

Engine modules are imported lazily inside fixtures (or not at all), so this file keeps working
while the package is being built.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.flavours import Flavour

#: Databases the private server offers; each test gets the next one, flushed (0 is left unused).
REDIS_DATABASES = 256
#: Seconds to wait for a fresh redis-server to answer PING.
REDIS_START_TIMEOUT = 10.0
#: The RESP version the result backend and test clients speak: 2, or 3 with
#: ``CTE_TEST_REDIS_PROTOCOL=3`` (the broker always speaks 2: kombu refuses ``protocol``).
REDIS_PROTOCOL = int(os.environ.get("CTE_TEST_REDIS_PROTOCOL", "2"))
#: Test modules of the store layer, run over RESP2 and RESP3 whatever ``REDIS_PROTOCOL`` says
#: (a module can ask for the same with ``pytestmark = pytest.mark.resp2_and_resp3``).
BOTH_PROTOCOLS_MODULES = frozenset(
    {"tests.test_redis_store", "tests.test_local_recording", "tests.test_early_read"}
)

_db_numbers = itertools.cycle(range(1, REDIS_DATABASES))


def in_ci() -> bool:
    """Whether we run in CI (``CI`` set to anything but an explicit no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip locally; fail in CI, where a missing service must not pass unnoticed."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    # A raw PING keeps this independent of redis-py's retry and backoff settings.
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _die_with_parent() -> None:
    """In the child: get SIGTERM if pytest dies without running its teardown (Linux only)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _start_redis(binary: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    """Start redis-server on a free port; retried because another process may grab the port."""
    log = workdir / "redis.log"
    for _attempt in range(3):
        port = _free_port()
        command = [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--databases", str(REDIS_DATABASES),
            "--dir", str(workdir),
        ]  # fmt: skip
        with log.open("ab") as out:
            proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers_ping(port):
                return proc, port, log
            time.sleep(0.05)
        _stop(proc)
    raise RuntimeError(f"redis-server did not answer PING; its log:\n{_tail(log)}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server for the session, as ``redis://127.0.0.1:PORT`` (no database).

    Stopped, and waited for, at the end of the session.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        skip_or_fail("redis-server is not on PATH")
    try:
        proc, port, _log = _start_redis(binary, tmp_path_factory.mktemp("redis"))
    except (OSError, RuntimeError) as exc:
        skip_or_fail(f"cannot start redis-server: {exc}")
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        # AsyncResults left over from tests unsubscribe from this server when collected; do
        # that now, while it answers, rather than at pytest's exit, where each one would
        # retry against a stopped server.
        for _ in range(3):
            gc.collect()
        _stop(proc)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run the store layer's Redis tests once per RESP version (ids ``resp2`` / ``resp3``)."""
    both = metafunc.module.__name__ in BOTH_PROTOCOLS_MODULES or any(
        mark.name == "resp2_and_resp3" for mark in metafunc.definition.iter_markers()
    )
    if both and "redis_protocol" in metafunc.fixturenames:
        metafunc.parametrize("redis_protocol", [2, 3], ids=["resp2", "resp3"], indirect=True)


@pytest.fixture
def redis_protocol(request: pytest.FixtureRequest) -> int:
    """The RESP version of the test's backend and clients: 2 or 3 (see ``REDIS_PROTOCOL``)."""
    protocol: int = getattr(request, "param", REDIS_PROTOCOL)
    if protocol not in (2, 3):
        raise ValueError(f"CTE_TEST_REDIS_PROTOCOL must be 2 or 3, not {protocol!r}")
    return protocol


@pytest.fixture
def redis_backend_url(redis_url: str, redis_protocol: int) -> str:
    """``redis_url`` as a result backend URL: with ``?protocol=3`` when the test speaks RESP3."""
    return f"{redis_url}?protocol=3" if redis_protocol == 3 else redis_url


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """``redis://127.0.0.1:PORT/DB`` on a database of its own, flushed before the test."""
    import redis

    url = f"{redis_server}/{next(_db_numbers)}"
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


@pytest.fixture
def redis_client(redis_backend_url: str) -> Iterator[Any]:
    """A ``redis.Redis`` on the test's database (raw bytes, no decoding), speaking the test's
    RESP version."""
    import redis

    client = redis.Redis.from_url(redis_backend_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def redis_app_factory(
    redis_url: str, redis_backend_url: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Any]]:
    """Make Celery apps on the test's database: ``make(**conf)`` -> a closed-after-test app.

    Broker and result backend share the test's database (the backend speaks the test's RESP
    version, see ``redis_protocol``); serializers are JSON. The apps are
    not set as the current app (``app.set_current()`` if a test needs that). Extra keyword
    arguments override configuration, e.g. ``make(taskengine_namespace="b")``.
    """
    from celery import Celery

    apps: list[Any] = []
    test_name = re.sub(r"[^A-Za-z0-9_]+", "-", request.node.name)[:60]

    def make(**conf: Any) -> Any:
        app = Celery(f"cte-{test_name}-{uuid.uuid4().hex[:8]}", set_as_current=False)
        settings: dict[str, Any] = {
            "broker_url": redis_url,
            "result_backend": redis_backend_url,
            "task_serializer": "json",
            "result_serializer": "json",
            "accept_content": ["json"],
            # fail fast, not for 20 s, when a test stopped the backend on purpose
            "result_backend_transport_options": {"retry_policy": {"max_retries": 1}},
        }
        app.conf.update({**settings, **conf})
        apps.append(app)
        return app

    yield make
    for app in apps:
        _close_app(app)


@pytest.fixture
def redis_app(redis_app_factory: Callable[..., Any]) -> Any:
    """A ``celery.Celery`` app with broker and result backend on the test's Redis database."""
    return redis_app_factory()


def _close_app(app: Any) -> None:
    backend = getattr(app, "_backend", None)  # only if the test created one
    if backend is not None:
        client = backend.__dict__.get("client")  # a cached property: None if never used
        if client is not None:
            client.connection_pool.disconnect()
    app.close()


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def flavour(request: pytest.FixtureRequest) -> Flavour:
    """The same task body as a ``def`` and as an ``async def`` (see tests/flavours.py)."""
    return Flavour(is_async=request.param)
