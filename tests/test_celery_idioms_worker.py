"""Celery's task idioms on engine tasks, against real workers on Redis (issue #14, part A).

The issue's "done means": a task written for Celery (``bind=True``, ``self.retry``,
``autoretry_for`` + ``retry_backoff`` + ``max_retries``) moved to the engine by changing only
its decorator makes the same attempts, waits the same delays and ends with the same exception,
and the engine adds its state history.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery, shared_task
from celery.result import AsyncResult

from celery_taskengine import Task, current_task_run, get_task_run, task
from tests import bridge_app
from tests.bridge_app import side
from tests.bridge_workers import ROOT, Worker, _new_queue, _release, _stop, wait_until_serving
from tests.workers import embedded_worker

pytestmark = pytest.mark.timeout(120)

#: The retry settings of the migrated task: Celery's and the engine's copy use the same ones.
RETRY_OPTIONS: dict[str, Any] = {
    "autoretry_for": (ConnectionError,),
    "retry_backoff": True,
    "retry_backoff_max": 2,
    "max_retries": 3,
    "retry_jitter": False,  # exact delays here; the jittered copies are checked by range
}
#: The delays Celery waits with those settings (backoff 1, the explicit countdown, backoff 2).
EXPECTED_DELAYS = [1.0, 1.5, 2.0]


def fetch(self: Any, key: str) -> str:
    """A task as written for Celery: autoretried on ConnectionError, one explicit retry."""
    side(self.app).rpush(key, json.dumps([time.time(), self.request.retries]))
    if self.request.retries == 1:
        raise self.retry(exc=LookupError("not yet"), countdown=1.5)
    raise ConnectionError(f"down at attempt {self.request.retries + 1}")


def request_probe(self: Any, key: str) -> str:
    """Records what ``self.request`` says in a worker; retries once through ``self.retry``."""
    request = self.request
    run = current_task_run()
    side(self.app).rpush(
        key,
        json.dumps(
            {
                "id": request.id,
                "retries": request.retries,
                "routing_key": (request.delivery_info or {}).get("routing_key"),
                "trace": (request.headers or {}).get("trace"),
                "run": run.id if run is not None else None,
            }
        ),
    )
    if request.retries == 0:
        raise self.retry(countdown=0.3)
    return str(request.id)


def settle(self: Any, key: str) -> str:
    """A Celery task that retries only by ``self.retry`` (``max_retries`` and no autoretry):
    one asked-for retry, then an error nobody asked to retry."""
    side(self.app).rpush(key, json.dumps([time.time(), self.request.retries]))
    if self.request.retries == 0:
        raise self.retry(countdown=0.2)
    raise KeyError(f"unknown at attempt {self.request.retries + 1}")


@shared_task(base=Task, name="idioms.worker.shared_mul")
def shared_mul(x: int, y: int) -> int:
    return x * y


def _register(app: Celery) -> SimpleNamespace:
    plain = app.task(bind=True, name="idioms.plain_fetch", shared=False, **RETRY_OPTIONS)
    engine = app.task(base=Task, bind=True, name="idioms.engine_fetch", shared=False,
                      **RETRY_OPTIONS)  # fmt: skip
    jitter = {**RETRY_OPTIONS, "retry_jitter": True}
    return SimpleNamespace(
        plain_fetch=plain(fetch),
        engine_fetch=engine(fetch),
        plain_jittered=app.task(bind=True, name="idioms.plain_jittered", shared=False, **jitter)(
            fetch
        ),
        engine_jittered=app.task(
            base=Task, bind=True, name="idioms.engine_jittered", shared=False, **jitter
        )(fetch),
        request_probe=task(app=app, bind=True, max_retries=1, name="idioms.request_probe")(
            request_probe
        ),
        plain_settle=app.task(bind=True, name="idioms.plain_settle", shared=False, max_retries=3)(
            settle
        ),
        engine_settle=app.task(
            base=Task, bind=True, name="idioms.engine_settle", shared=False, max_retries=3
        )(settle),
    )


@pytest.fixture(scope="module")
def worker(redis_server: str) -> Iterator[Worker]:
    """A solo in-process worker on Redis serving the bridge's tasks and this module's."""
    backend = f"{redis_server}/0"
    queue = _new_queue()
    app, tasks = bridge_app.make_app(backend, backend, queue)
    tasks.__dict__.update(vars(_register(app)))
    try:
        with embedded_worker(app):
            running = Worker(app, tasks, queue, "solo")
            wait_until_serving(running)
            yield running
    finally:
        _release(app, queue)


def attempts(w: Worker, key: str) -> list[tuple[float, int]]:
    return [tuple(json.loads(item)) for item in side(w.app).lrange(key, 0, -1)]  # type: ignore[misc]


def final_error(result: AsyncResult) -> BaseException:
    with pytest.raises(Exception) as caught:
        result.get(timeout=30)
    return caught.value


def test_a_celery_task_moved_to_the_engine_by_its_decorator_behaves_as_under_celery(
    worker: Worker,
) -> None:
    plain_key, engine_key = worker.key("plain"), worker.key("engine")

    plain = worker.tasks.plain_fetch.delay(plain_key)
    engine = worker.tasks.engine_fetch.delay(engine_key)
    plain_error, engine_error = final_error(plain), final_error(engine)

    plain_attempts, engine_attempts = attempts(worker, plain_key), attempts(worker, engine_key)
    assert [r for _, r in plain_attempts] == [r for _, r in engine_attempts] == [0, 1, 2, 3]
    plain_gaps = [b[0] - a[0] for a, b in itertools.pairwise(plain_attempts)]
    engine_gaps = [b[0] - a[0] for a, b in itertools.pairwise(engine_attempts)]
    for expected, plain_gap, engine_gap in zip(
        EXPECTED_DELAYS, plain_gaps, engine_gaps, strict=True
    ):
        assert expected - 0.05 <= plain_gap < expected + 1.0
        assert expected - 0.05 <= engine_gap < expected + 1.0
        assert abs(plain_gap - engine_gap) < 0.6
    assert type(plain_error) is type(engine_error) is ConnectionError
    assert str(plain_error) == str(engine_error) == "down at attempt 4"
    run = get_task_run(engine.id, worker.app)
    assert run is not None and run.run_count == 4
    assert run.history_names() == [
        "Pending", "Running",
        "AwaitingRetry", "Retrying", "AwaitingRetry", "Retrying", "AwaitingRetry", "Retrying",
        "Failed",
    ]  # fmt: skip


def test_max_retries_without_autoretry_retries_only_what_self_retry_asks_for_as_celery(
    worker: Worker,
) -> None:
    plain_key, engine_key = worker.key("plain-settle"), worker.key("engine-settle")

    plain = worker.tasks.plain_settle.delay(plain_key)
    engine = worker.tasks.engine_settle.delay(engine_key)
    plain_error, engine_error = final_error(plain), final_error(engine)

    # One retry asked for, then the KeyError fails the task at once, with retries left.
    assert [r for _, r in attempts(worker, plain_key)] == [0, 1]
    assert [r for _, r in attempts(worker, engine_key)] == [0, 1]
    assert type(plain_error) is type(engine_error) is KeyError
    run = get_task_run(engine.id, worker.app)
    assert run is not None
    assert run.history_names() == ["Pending", "Running", "AwaitingRetry", "Retrying", "Failed"]


def test_retry_jitter_spreads_delays_as_celery_does(worker: Worker) -> None:
    plain_key, engine_key = worker.key("plain-jitter"), worker.key("engine-jitter")

    plain = worker.tasks.plain_jittered.delay(plain_key)
    engine = worker.tasks.engine_jittered.delay(engine_key)
    errors = final_error(plain), final_error(engine)

    for key in (plain_key, engine_key):
        seen = attempts(worker, key)
        assert [r for _, r in seen] == [0, 1, 2, 3]
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(seen)]
        # Full jitter: backoff delays anywhere in [0, delay]; the explicit countdown exact.
        assert -0.05 <= gaps[0] < 1.0 + 1.0
        assert 1.5 - 0.05 <= gaps[1] < 1.5 + 1.0
        assert -0.05 <= gaps[2] < 2.0 + 1.0
    assert [type(e) for e in errors] == [ConnectionError, ConnectionError]


def test_self_request_in_a_worker_is_the_deliverys_and_self_retry_is_an_engine_retry(
    worker: Worker,
) -> None:
    key = worker.key("request")

    result = worker.tasks.request_probe.apply_async((key,), headers={"trace": "abc"})

    assert result.get(timeout=30) == result.id
    seen = [json.loads(item) for item in side(worker.app).lrange(key, 0, -1)]
    assert [s["retries"] for s in seen] == [0, 1]
    assert {s["id"] for s in seen} == {s["run"] for s in seen} == {result.id}
    assert {s["routing_key"] for s in seen} == {worker.queue}
    assert seen[0]["trace"] == "abc"
    run = get_task_run(result.id, worker.app)
    assert run is not None
    assert run.history_names() == ["Pending", "Running", "AwaitingRetry", "Retrying", "Completed"]


def test_celerys_shared_task_with_the_engine_base_runs_in_a_worker(worker: Worker) -> None:
    result = shared_mul.apply_async((3, 4), queue=worker.queue)

    assert result.get(timeout=30) == 12
    run = get_task_run(result.id, worker.app)
    assert run is not None and run.history_names() == ["Pending", "Running", "Completed"]


# --- a library's tasks, defined before any app exists ---------------------------------------


@pytest.fixture
def project_worker(redis_url: str, tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """``celery -A tests.idioms.project worker`` in a subprocess; its log file; stopped after."""
    env = {
        **os.environ,
        "IDIOMS_BROKER_URL": redis_url,
        "IDIOMS_BACKEND_URL": redis_url,
        "IDIOMS_QUEUE": _new_queue(),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    log = tmp_path / "worker.log"
    command = [
        sys.executable, "-m", "celery", "-A", "tests.idioms.project", "worker",
        "--pool=solo", "-l", "info", "--without-gossip", "--without-mingle",
        "-n", f"{env['IDIOMS_QUEUE']}@%h",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield env, log
    finally:
        with contextlib.suppress(Exception):
            _stop(proc)


def test_a_librarys_tasks_defined_before_any_app_run_on_the_app_created_later(
    project_worker: tuple[dict[str, str], Path],
) -> None:
    env, log = project_worker

    done = subprocess.run(
        [sys.executable, "-m", "tests.idioms.client"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=90,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["local_before_app"] == 5
    assert seen["sent_before_app"].startswith(
        "refused: task 'idioms.library.add' has no Celery app"
    )
    assert seen["bound_to_project"] is True
    assert (seen["add"], seen["mul"], seen["whoami_is_its_id"]) == (5, 12, True)
    assert "unregistered task" not in log.read_text()
