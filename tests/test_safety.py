"""Safe by default (SPEC §6, §8): JSON unless pickle is asked for *and* accepted, nothing planted
in Redis is ever unpickled, and every record lives in its own namespace.

The checks read raw Redis bytes and keys, so they hold whatever the store's API says.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_taskengine import flush_run_records, get_task_run, task
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._store.cache_codec import encode_record
from celery_taskengine._store.redis_store import RedisStore
from celery_taskengine.cache_policies import INPUTS
from celery_taskengine.errors import SerializationError
from celery_taskengine.states import Completed, Failed, Pending, Running
from celery_taskengine.task_engine import run_task_sync

CACHE_KEY = "safety/answer"
#: The opcode every pickle of protocol 2 or later starts with.
PICKLE_MAGIC = b"\x80"


class MakesMarker:
    """Unpickling this creates the directory ``path``: proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.mkdir, (str(self.path),))


def raw_values(client: Any) -> dict[str, bytes]:
    """Every string key in the database and its raw bytes."""
    return {
        key.decode(): client.get(key) for key in client.keys("*") if client.type(key) == b"string"
    }


def wait_for_key(client: Any, key: str) -> None:
    """Local runs write their record from a background thread: wait until it is there.

    (Other tests' writers may be stuck on a backend they stopped; only this key matters here.)
    """
    flush_run_records(timeout=2)
    for _ in range(100):
        raw = client.get(key)
        if raw is not None and json.loads(raw)["state_history"][-1]["type"] in FINAL_TYPES:
            return
        time.sleep(0.05)
    raise AssertionError(f"{key!r} was never written with a final state")


FINAL_TYPES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def answer_task(app: Celery, calls: list[int], **options: Any) -> Any:
    @task(app=app, name="safety.answer", cache_key_fn=lambda ctx, params: CACHE_KEY, **options)
    def answer() -> Any:
        calls.append(1)
        return {"answer": 42, "tags": ["a", "b"]}

    return answer


@pytest.fixture
def default_app(redis_url: str) -> Iterator[Celery]:
    """An app configured with nothing but its broker and backend: Celery's defaults otherwise."""
    app = Celery(f"safety-{uuid.uuid4().hex[:8]}", set_as_current=False)
    app.conf.update(broker_url=redis_url, result_backend=redis_url)
    yield app
    app.backend.client.connection_pool.disconnect()
    app.close()


# === JSON by default =========================================================================


def test_task_arguments_are_sent_as_json_by_default(default_app: Celery, redis_client: Any) -> None:
    @task(app=default_app, name="safety.add")
    def add(x: int, y: int) -> int:
        return x + y

    add.delay(1, y=2)

    (raw,) = redis_client.lrange("celery", 0, -1)
    message = json.loads(raw)
    assert message["content-type"] == "application/json"
    args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert (args, kwargs) == ([1], {"y": 2})


def test_cached_results_and_run_records_are_json_by_default(
    default_app: Celery, redis_client: Any
) -> None:
    calls: list[int] = []
    answer = answer_task(default_app, calls)
    assert answer.engine_options.result_serializer == "json"

    run_task_sync(answer, task_run_id="safety-run")

    store = RedisStore.for_app(default_app)
    wait_for_key(redis_client, store.key_for("run", "safety-run"))
    record = json.loads(redis_client.get(store.key_for("cache", CACHE_KEY)))
    assert record["serializer"] == "json" and record["content_type"] == "application/json"
    assert json.loads(record["payload"]) == {"answer": 42, "tags": ["a", "b"]}
    run = json.loads(redis_client.get(store.key_for("run", "safety-run")))
    assert run["state_history"][-1]["data"] == {"answer": 42, "tags": ["a", "b"]}
    assert not any(value.startswith(PICKLE_MAGIC) for value in raw_values(redis_client).values())


# === pickle only on request, and only where accepted =========================================


def test_a_pickle_result_serializer_on_an_app_that_does_not_accept_pickle_writes_nothing(
    default_app: Celery, redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []
    answer = answer_task(default_app, calls, result_serializer="pickle")

    with caplog.at_level(logging.WARNING, logger="celery_taskengine"):
        assert answer() == {"answer": 42, "tags": ["a", "b"]}

    assert "'pickle'" in caplog.text and "result_accept_content" in caplog.text
    store = RedisStore.for_app(default_app)
    assert redis_client.exists(store.key_for("cache", CACHE_KEY)) == 0
    assert not any(PICKLE_MAGIC in value for value in raw_values(redis_client).values())
    # And with nothing cached, the next call runs again instead of reading a pickle
    answer()
    assert calls == [1, 1]


@pytest.mark.parametrize(
    "accept",
    [
        pytest.param({"result_accept_content": ["json", "pickle"]}, id="result-accept-content"),
        pytest.param({"accept_content": ["json", "pickle"]}, id="accept-content-fallback"),
        pytest.param(
            {"result_accept_content": ["application/json", "application/x-python-serialize"]},
            id="mime-types",
        ),
    ],
)
def test_pickle_works_when_the_app_accepts_it(
    accept: dict[str, Any], redis_app_factory: Callable[..., Celery], redis_client: Any
) -> None:
    app = redis_app_factory(**accept)
    calls: list[int] = []

    @task(app=app, name="safety.sets", cache_policy=INPUTS, result_serializer="pickle")
    def sets(n: int) -> set[int]:
        calls.append(1)
        return set(range(n))

    first, second = sets(3, return_state=True), sets(3, return_state=True)

    assert (first.name, second.name) == ("Completed", "Cached")
    assert second.result() == {0, 1, 2} and calls == [1]
    (cache_key,) = redis_client.keys("cte:default:cache:*")
    record = json.loads(redis_client.get(cache_key))
    assert record["serializer"] == "pickle"
    assert base64.b64decode(record["payload"]).startswith(PICKLE_MAGIC)


def test_sending_with_the_pickle_serializer_to_an_app_that_refuses_it_fails_at_send(
    default_app: Celery, redis_client: Any
) -> None:
    @task(app=default_app, name="safety.add")
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(SerializationError, match="pickle"):
        add.apply_async((1, 2), serializer="pickle")
    assert redis_client.llen("celery") == 0


# === a planted pickle is never loaded ========================================================


def planted_cache_records(trap: MakesMarker) -> dict[str, bytes]:
    """Ways to put a hostile pickle under the cache key, by what they pretend to be."""
    payload = pickle.dumps(trap)
    envelope = json.loads(
        encode_record(
            CACHE_KEY,
            0,
            serializer="json",
            accept=["json"],
            created_at=datetime.now(timezone.utc),
        )
    )
    lying = {
        **envelope,
        "serializer": "json",
        "content_type": "application/x-python-serialize",
        "content_encoding": "binary",
        "payload": base64.b64encode(payload).decode(),
    }
    honest = {
        **envelope,
        "serializer": "pickle",
        "content_type": "application/x-python-serialize",
        "content_encoding": "binary",
        "payload": base64.b64encode(payload).decode(),
    }
    return {
        "raw-pickle": payload,
        "pickle-envelope": json.dumps(honest).encode(),
        "envelope-claiming-json": json.dumps(lying).encode(),
    }


@pytest.mark.parametrize("planted", ["raw-pickle", "pickle-envelope", "envelope-claiming-json"])
@pytest.mark.parametrize(
    "conf",
    [
        pytest.param({}, id="json-only-app"),
        pytest.param(
            {"accept_content": ["json", "pickle"], "result_accept_content": ["json"]},
            id="pickle-for-messages-only",
        ),
    ],
)
def test_a_pickle_planted_under_a_cache_key_is_never_unpickled(
    planted: str,
    conf: dict[str, Any],
    redis_app_factory: Callable[..., Celery],
    redis_client: Any,
    tmp_path: Path,
) -> None:
    # Given a pickle whose loading would create a directory, and proof that the trap is armed
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(MakesMarker(armed)))
    assert armed.is_dir()
    marker = tmp_path / "unpickled"
    app = redis_app_factory(**conf)
    store = RedisStore.for_app(app)
    redis_client.set(
        store.key_for("cache", CACHE_KEY), planted_cache_records(MakesMarker(marker))[planted]
    )
    calls: list[int] = []
    answer = answer_task(app, calls)

    # When the record is read every way there is
    assert store.read(CACHE_KEY) is None
    state = answer(return_state=True)

    # Then it was a miss, the task ran, and the pickle was never loaded
    assert state.name == "Completed" and calls == [1]
    assert not marker.exists()


def test_a_pickle_planted_as_a_run_record_is_never_unpickled(
    redis_app: Celery, redis_client: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    store = RedisStore.for_app(redis_app)
    redis_client.set(store.key_for("run", "planted"), pickle.dumps(MakesMarker(marker)))

    assert get_task_run("planted", app=redis_app) is None
    assert store.iter_runs(10) == []
    assert not marker.exists()


def test_a_run_record_naming_an_unimported_module_does_not_import_it(
    redis_app: Celery,
    redis_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a module whose import would leave a marker, and a planted failed run naming it
    marker = tmp_path / "imported"
    module = f"safety_planted_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text(
        f"import os\nos.mkdir({str(marker)!r})\nclass Boom(Exception):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    failed = Failed(message="planted", data=RuntimeError("planted"))
    run = TaskRun(
        id="planted",
        name="planted",
        task_name="safety.planted",
        state=failed,
        state_history=[Pending(), Running(), failed],
    )
    document = run.to_document()
    document["state_history"][-1]["exception"] = {
        "exc_type": "Boom",
        "exc_module": module,
        "exc_message": "from a planted record",
    }
    redis_client.set(RedisStore.for_app(redis_app).key_for("run", "planted"), json.dumps(document))

    # When the run is read
    loaded = get_task_run("planted", app=redis_app)

    # Then the exception keeps its name and message, and the module was never imported
    assert loaded is not None and loaded.state is not None
    assert str(loaded.state.data) == "Boom: from a planted record"
    assert module not in sys.modules
    assert not marker.exists()


def test_a_run_record_naming_an_imported_exception_class_rebuilds_it(
    redis_app: Celery, redis_client: Any
) -> None:
    completed = Completed(data=None)
    run = TaskRun(id="r", name="r", task_name="t", state=completed, state_history=[completed])
    document = run.to_document()
    document["state_history"][-1]["exception"] = {
        "exc_type": "SerializationError",
        "exc_module": "celery_taskengine.errors",
        "exc_message": "kept",
    }
    redis_client.set(RedisStore.for_app(redis_app).key_for("run", "r"), json.dumps(document))

    loaded = get_task_run("r", app=redis_app)

    assert loaded is not None and loaded.state is not None
    assert isinstance(loaded.state.data, SerializationError)
    assert str(loaded.state.data) == "kept"


# === namespaces ==============================================================================


def test_every_key_the_engine_writes_is_in_its_namespace_never_celerys(
    redis_app_factory: Callable[..., Celery], redis_client: Any
) -> None:
    app = redis_app_factory(taskengine_namespace="tenant-a")
    calls: list[int] = []

    run_task_sync(answer_task(app, calls), task_run_id="namespaced")

    wait_for_key(redis_client, "cte:tenant-a:run:namespaced")
    keys = sorted(k.decode() for k in redis_client.keys("*"))
    index = [k for k in keys if k.startswith("cte:tenant-a:index:")]  # the run index
    assert [k for k in keys if k not in index] == [
        "cte:tenant-a:cache:safety/answer",
        "cte:tenant-a:run:namespaced",
    ]


def test_two_apps_with_different_namespaces_never_see_each_others_records(
    redis_app_factory: Callable[..., Celery], redis_client: Any
) -> None:
    # Given two apps on one Redis database, each with a task of the same name and cache key
    billing = redis_app_factory(taskengine_namespace="billing")
    reports = redis_app_factory(taskengine_namespace="reports")
    billing_calls: list[int] = []
    reports_calls: list[int] = []
    billing_answer = answer_task(billing, billing_calls)
    reports_answer = answer_task(reports, reports_calls)

    # When each runs
    run_task_sync(billing_answer, task_run_id="billing-run")
    second = reports_answer(return_state=True)

    # Then neither found the other's cached result, and each finds its own
    assert second.name == "Completed" and reports_calls == [1]
    assert billing_answer(return_state=True).name == "Cached" and billing_calls == [1]
    # And run records are as separate as results
    wait_for_key(redis_client, "cte:billing:run:billing-run")
    assert RedisStore.for_app(billing).load_run("billing-run") is not None
    assert RedisStore.for_app(reports).load_run("billing-run") is None


def test_the_backends_global_keyprefix_comes_before_every_engine_key(
    redis_app_factory: Callable[..., Celery], redis_client: Any
) -> None:
    app = redis_app_factory(result_backend_transport_options={"global_keyprefix": "tenant1"})
    calls: list[int] = []
    answer = answer_task(app, calls)

    run_task_sync(answer, task_run_id="prefixed")
    assert answer(return_state=True).name == "Cached"

    wait_for_key(redis_client, "tenant1_cte:default:run:prefixed")
    engine_keys = [k.decode() for k in redis_client.keys("*cte:*")]
    assert engine_keys and all(k.startswith("tenant1_cte:default:") for k in engine_keys)
