"""Flower, started against the test broker, shows engine states for engine tasks (SPEC §7)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests.test_worker_bridge import worker_process

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def flower(app_on_redis: Celery, tmp_path: Path) -> Iterator[str]:
    """A Flower process on the app's broker, with the engine's fields shown; its base URL."""
    port = free_port()
    conf = tmp_path / "flowerconfig.py"
    conf.write_text(
        "from celery_taskengine.flower import show_engine_fields\nshow_engine_fields()\n"
    )
    env = {
        **os.environ,
        "BRIDGE_BROKER_URL": app_on_redis.conf.broker_url,
        "BRIDGE_BACKEND_URL": app_on_redis.conf.result_backend,
        "FLOWER_UNAUTHENTICATED_API": "true",
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "celery", "-A", "tests.bridge.worker_app", "flower"]
    command += [f"--port={port}", "--address=127.0.0.1", f"--conf={conf}"]
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get_json(f"{base}/api/workers?refresh=false")
                break
            except OSError:
                assert proc.poll() is None, "flower exited during start-up"
                assert time.monotonic() < deadline, "flower never answered"
                time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def app_on_redis(redis_app_factory: Callable[..., Celery]) -> Celery:
    return redis_app_factory(task_default_queue=f"flower-{uuid.uuid4().hex[:8]}")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_for_task(base: str, task_id: str, check: Callable[[dict[str, Any]], bool]) -> None:
    deadline = time.monotonic() + 30
    seen: list[tuple[Any, Any]] = []
    while time.monotonic() < deadline:
        try:
            last = get_json(f"{base}/api/task/info/{task_id}")
        except OSError:
            continue
        pair = (last.get("state"), last.get("engine_state"))
        if not seen or seen[-1] != pair:
            seen.append(pair)
        if check(last):
            return
        time.sleep(0.1)
    raise AssertionError(f"Flower never showed the expected state for {task_id}; saw {seen}")


def states_in_flower(base: str, task_id: str, until: str) -> list[tuple[float, str, bool]]:
    """Poll Flower until ``task_id`` is in state ``until``: each change of state, when it was
    first seen, and whether the task list filtered by that state listed the task then."""
    seen: list[tuple[float, str, bool]] = []
    start = deadline = time.monotonic()
    deadline += 30
    while time.monotonic() < deadline:
        try:
            state = get_json(f"{base}/api/task/info/{task_id}").get("state")
        except OSError:
            state = None  # not known to Flower yet (404)
        if state is not None and (not seen or seen[-1][1] != state):
            listed = get_json(f"{base}/api/tasks?state={state}")
            seen.append((time.monotonic() - start, state, task_id in listed))
        if state == until:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"Flower never showed {until} for {task_id}; saw {seen}")


def test_flower_shows_the_engine_states_of_engine_tasks(app_on_redis: Celery, flower: str) -> None:
    from tests.bridge import worker_app

    queue = app_on_redis.conf.task_default_queue
    with worker_process(app_on_redis, "solo"):
        # a run that waits 3 s for its retry shows AWAITING-RETRY for the whole wait (neither
        # Celery's RETRY nor the countdown copy's RECEIVED or STARTED replace it), in the task
        # and in the task list; then RETRYING while the retry runs, then SUCCESS
        retried = app_on_redis.send_task(worker_app.retry_once.name, queue=queue)
        seen = states_in_flower(flower, retried.id, until="SUCCESS")
        names = [state for _, state, _ in seen]
        assert "AWAITING-RETRY" in names, seen
        after = seen[names.index("AWAITING-RETRY") :]
        assert [state for _, state, _ in after] == ["AWAITING-RETRY", "RETRYING", "SUCCESS"]
        assert all(listed for _, _, listed in after), seen
        assert after[1][0] - after[0][0] > 2.5, seen  # shown until the retry started
        assert retried.get(timeout=30) == "second attempt"
        wait_for_task(flower, retried.id, lambda t: t["state"] == "SUCCESS" and t["run_count"] == 2)
        # a timeout and a worker-side cache hit end as Celery's final states, with the engine
        # state kept beside them
        timed_out = app_on_redis.send_task(worker_app.sleepy.name, args=[5], queue=queue)
        wait_for_task(
            flower,
            timed_out.id,
            lambda t: t["state"] == "FAILURE" and t["engine_state"] == "TimedOut",
        )
        first = app_on_redis.send_task(worker_app.remembered.name, args=[3], queue=queue)
        assert first.get(timeout=20) == 9
        hit = app_on_redis.send_task(worker_app.remembered.name, args=[3], queue=queue)
        assert hit.get(timeout=20) == 9
        wait_for_task(
            flower, hit.id, lambda t: t["state"] == "SUCCESS" and t["engine_state"] == "Cached"
        )
        # and the task list shows them too
        listed = get_json(f"{flower}/api/tasks?state=SUCCESS")
        assert listed[hit.id]["engine_state"] == "Cached"
