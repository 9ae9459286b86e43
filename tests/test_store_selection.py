"""Which store an app gets: decided by the backend class Celery builds, not the URL's spelling.

Every Redis flavour Celery accepts (``redis://``, ``redis+socket://``, a bare ``"redis"`` with
``redis_*`` settings, ``sentinel://``) gives the shared Redis store; other backends keep the
per-process memory store. The unix-socket case runs a real ``celery worker`` on a real
``redis-server`` listening only on a socket.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_taskengine import flush_run_records, get_task_run, task
from celery_taskengine._store.selection import store_for_app
from celery_taskengine.cache_policies import INPUTS
from celery_taskengine.errors import ConfigurationError
from tests.bridge_app import side
from tests.bridge_workers import subprocess_worker
from tests.conftest import _die_with_parent, _stop, skip_or_fail

pytestmark = pytest.mark.timeout(120)


def _app(**conf: Any) -> Celery:
    app = Celery("cte-selection", set_as_current=False)
    app.conf.update(conf)
    return app


@pytest.fixture(scope="module")
def socket_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A redis-server that listens on a unix socket only (no TCP port)."""
    binary = shutil.which("redis-server")
    if binary is None:
        skip_or_fail("redis-server is not on PATH")
    workdir = tmp_path_factory.mktemp("socket-redis")
    path = workdir / "redis.sock"
    command = [
        binary, "--port", "0", "--unixsocket", str(path), "--unixsocketperm", "700",
        "--save", "", "--appendonly", "no", "--dir", str(workdir),
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
    )
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                skip_or_fail("redis-server did not open its unix socket")
            time.sleep(0.05)
        yield path
    finally:
        _stop(proc)


@pytest.mark.parametrize(
    "conf",
    [
        {"result_backend": "redis://127.0.0.1:6399/3"},
        {"result_backend": "rediss://127.0.0.1:6399/3?ssl_cert_reqs=none"},
        {"result_backend": "redis+socket:///tmp/cte-missing.sock"},
        {"result_backend": "redis", "redis_host": "127.0.0.1", "redis_port": 6399},
        {"result_backend": "sentinel://127.0.0.1:26399/0;sentinel://127.0.0.1:26400/0"},
    ],
    ids=["redis", "rediss", "redis+socket", "bare-redis-with-settings", "sentinel"],
)
def test_every_redis_flavour_celery_accepts_gets_the_shared_redis_store(
    conf: dict[str, Any],
) -> None:
    store = store_for_app(_app(**conf))

    assert store.shared
    assert store.supports_locking


@pytest.mark.parametrize(
    "conf",
    [{"result_backend": "rpc://"}, {"result_backend": "cache+memory://"}, {}],
    ids=["rpc", "cache+memory", "no-backend"],
)
def test_backends_that_cannot_hold_records_keep_the_per_process_store(
    conf: dict[str, Any],
) -> None:
    store = store_for_app(_app(**conf))

    assert not store.shared


def test_a_database_result_backend_gets_the_sql_store_on_the_same_database(
    tmp_path: Path,
) -> None:
    path = tmp_path / "results.db"

    store = store_for_app(_app(result_backend=f"db+sqlite:///{path}"))

    assert store.shared
    assert store.url == f"sqlite:///{path}"


@pytest.mark.parametrize(
    ("setting", "shared"),
    [
        ("redis://127.0.0.1:6399/2", True),
        ("sentinel://127.0.0.1:26399/0", True),
        ("sqlite:///{tmp}/engine.db", True),
        ("postgresql+psycopg://postgres@127.0.0.1:5432/test", True),
        ("memory://", False),
    ],
    ids=["redis", "sentinel", "sqlite", "postgresql", "memory"],
)
def test_the_store_setting_overrides_what_the_result_backend_would_give(
    setting: str, shared: bool, tmp_path: Path
) -> None:
    app = _app(result_backend="rpc://", taskengine_store=setting.format(tmp=tmp_path))

    assert store_for_app(app).shared is shared


def test_a_unix_socket_store_setting_reaches_the_server_on_that_socket(socket_redis: Path) -> None:
    """``redis+socket://`` as a setting: the URL Celery gives its backend (``socket://``) is
    used, not the one written (which once made the socket path a database number)."""
    app = _app(result_backend="rpc://", taskengine_store=f"redis+socket://{socket_redis}")
    calls: list[int] = []

    @task(app=app, name="socket.square", cache_policy=INPUTS)
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    assert [square(6) for _ in range(2)] == [36, 36]
    assert calls == [6]
    assert flush_run_records(app)
    server = redis.Redis(unix_socket_path=str(socket_redis))
    assert server.keys("cte:default:cache:*") and server.keys("cte:default:run:*")
    app.close()


def test_django_settings_name_the_store_with_their_namespace(tmp_path: Path) -> None:
    class Settings:
        CELERY_RESULT_BACKEND = "django-db"
        CELERY_TASKENGINE_STORE = f"sqlite:///{tmp_path / 'django.db'}"

    app = Celery("cte-django", set_as_current=False)
    app.config_from_object(Settings, namespace="CELERY")

    assert store_for_app(app).url == Settings.CELERY_TASKENGINE_STORE


@pytest.mark.parametrize("setting", ["ftp://example/x", "nonsense", 42])
def test_a_store_setting_that_names_no_store_is_a_configuration_error(setting: Any) -> None:
    with pytest.raises(ConfigurationError, match="taskengine_store"):
        store_for_app(_app(result_backend="rpc://", taskengine_store=setting))


def test_a_worker_on_a_unix_socket_backend_shares_runs_and_cache_with_the_producer(
    socket_redis: Path,
) -> None:
    url = f"redis+socket://{socket_redis}"
    with subprocess_worker(url, url, pool="prefork", concurrency=2) as worker:
        counter = worker.key("counter")
        first = worker.tasks.cached.delay(7, counter)
        assert first.get(timeout=30) == 70
        second = worker.tasks.cached.delay(7, counter)
        assert second.get(timeout=30) == 70

        assert int(side(worker.app).get(counter)) == 1  # the second call was a cache hit
        run = get_task_run(first.id, app=worker.app)  # read from the producer's process
        assert run is not None
        assert run.history_names()[-1] == "Completed"
        assert store_for_app(worker.app).shared
