"""The Celery app the reliability tests run in ``celery worker`` subprocesses.

``make_app(broker, backend, queue, ...)`` builds the app with every test task registered; the
module's ``app`` is configured from the environment so that
``celery -A tests.reliability.worker_app worker`` serves the same tasks:

``RELIABILITY_BROKER_URL`` / ``RELIABILITY_BACKEND_URL``
    broker and result backend (the backend defaults to the broker);
``RELIABILITY_QUEUE``
    the queue the tasks use;
``RELIABILITY_VISIBILITY_TIMEOUT``
    seconds before Redis gives an unacknowledged message to a worker again;
``RELIABILITY_LOCK_TTL``
    seconds a SERIALIZABLE lock lives unless renewed (``transactions.LOCK_TTL_SECONDS``);
``RELIABILITY_BACKEND_MAX_RETRIES``
    the result backend's ``retry_policy`` ``max_retries`` (how long an outage is waited out).

Tasks talk to the tests through Redis keys on the result backend (see :func:`side`): counters
of how often a function body ran, gates the test opens. Every key a test passes is its own.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import redis
from celery import Celery
from celery.signals import task_postrun, task_prerun

from celery_taskengine import task, transactions
from celery_taskengine.cache_policies import INPUTS
from celery_taskengine.transactions import IsolationLevel

#: Seconds a task waits at most for a gate the test opens.
GATE_TIMEOUT = 60.0
#: Seconds Redis keeps an unacknowledged message from other workers (Celery's default: 3600).
DEFAULT_VISIBILITY_TIMEOUT = 3.0
#: Seconds kombu's lock on the sweep that restores unacknowledged messages outlives a holder
#: that died holding it (kombu's ``unacked_mutex_expire``; its default, 300 s, held a killed
#: worker's messages back for five minutes).
UNACKED_MUTEX_EXPIRE = 5
#: The soak task's timeout (seconds): 20 times its longest regular body, so that a loaded
#: 2-core machine does not time out runs that are not meant to.
SOAK_TIMEOUT = 0.2
#: Seconds a delivery's claim on its message lives unless renewed (delivery_claims): how long
#: a killed delivery's message waits before another delivery takes its run over.
CLAIM_TTL = 2.0
#: How long the soak tasks' results are cached (seconds): every cache record gets a TTL.
SOAK_CACHE_EXPIRATION = 300.0
#: Seconds results and run records live (Celery's ``result_expires``).
RESULT_EXPIRES = 600
#: Where the workers log each delivery they start (see _log_delivery).
DELIVERIES = "rel:deliveries"


def make_app(
    broker: str,
    backend: str | None = None,
    queue: str = "rel",
    *,
    visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
    **conf: Any,
) -> tuple[Celery, SimpleNamespace]:
    """A Celery app on ``broker``/``backend`` whose tasks use ``queue``, and its test tasks.

    Configured as a deployment that wants at-least-once delivery: late acks, messages of a
    lost worker process requeued, a short visibility timeout (restored by a sweep every half
    second, so a dead worker's messages come back within about ``visibility_timeout`` + 0.5 s,
    or ``UNACKED_MUTEX_EXPIRE`` when a worker was killed while sweeping),
    backend writes retried while Redis is away.
    """
    app = Celery("cte-reliability", set_as_current=False)
    transport = {
        "visibility_timeout": visibility_timeout,
        "unacked_restore_interval": 0.5,
        "unacked_restore_throttle": 1,
        # The sweep runs under a Redis lock that outlives a SIGKILLed holder by this long
        # (kombu's default: 300 s, in which no message of a dead worker comes back).
        "unacked_mutex_expire": UNACKED_MUTEX_EXPIRE,
    }
    app.conf.update(
        broker_url=broker,
        result_backend=backend or broker,
        task_default_queue=queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        result_backend_transport_options={"visibility_timeout": visibility_timeout},
        broker_connection_retry_on_startup=True,
        result_backend_always_retry=True,
        result_backend_max_retries=20,
        result_expires=RESULT_EXPIRES,
        worker_hijack_root_logger=True,
        taskengine_claim_ttl=CLAIM_TTL,
    )
    app.conf.update(conf)
    return app, _register_tasks(app)


def side(app: Celery) -> Any:
    """The Redis client tasks and tests share side-channel keys on: the result backend's, or
    the broker's when results go to a database."""
    client = getattr(app.backend, "client", None)
    return client if isinstance(client, redis.Redis) else broker_side(app)


def broker_side(app: Celery) -> Any:
    """A Redis client on the broker, for counters that must work while the backend is down."""
    client = getattr(app, "_rel_broker_side", None)
    if client is None:
        client = app._rel_broker_side = redis.Redis.from_url(app.conf.broker_url)
    return client


def wait_for_gate(app: Celery, gate: str) -> None:
    deadline = time.monotonic() + GATE_TIMEOUT
    while not side(app).exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate!r} was never opened")
        time.sleep(0.01)


def _register_tasks(app: Celery) -> SimpleNamespace:
    @app.task(name="rel.probe", shared=False)
    def probe() -> int:
        return os.getpid()

    @task(
        app=app,
        name="rel.work",
        cache_policy=INPUTS,
        cache_expiration=600,
        acks_late=True,
        reject_on_worker_lost=True,
    )
    def work(key: str, sleep: float) -> dict[str, Any]:
        """Counts its executions of ``key`` and returns which execution produced the value.

        ``exec:<key>`` counts bodies started, ``finished:<key>`` bodies that got to the end.
        """
        r = side(app)
        execution = int(r.incr(f"exec:{key}"))
        r.set(f"busy:{os.getpid()}", key)
        time.sleep(sleep)
        r.incr(f"finished:{key}")
        return {"key": key, "execution": execution}

    @task(app=app, name="rel.gated", acks_late=True, reject_on_worker_lost=True)
    def gated(key: str, gate: str) -> str:
        """Counts its executions, then waits for ``gate``."""
        side(app).incr(f"exec:{key}")
        wait_for_gate(app, gate)
        return f"done {key}"

    @task(
        app=app,
        name="rel.flaky",
        retries=2,
        retry_delay_seconds=4,
        acks_late=True,
        reject_on_worker_lost=True,
    )
    def flaky(key: str, failures: int) -> int:
        """Fails its first ``failures`` executions (counted across deliveries)."""
        execution = int(side(app).incr(f"exec:{key}"))
        if execution <= failures:
            raise ConnectionError(f"execution {execution} fails")
        return execution

    # The gate only tells a test's run when to go on: runs differing in it share the lock.
    serializable = (INPUTS - "gate").configure(isolation_level=IsolationLevel.SERIALIZABLE)

    @task(
        app=app,
        name="rel.locked",
        cache_policy=serializable,
        cache_expiration=600,
        acks_late=True,
        reject_on_worker_lost=True,
    )
    def locked(key: str, sleep: float, gate: str = "") -> dict[str, Any]:
        """SERIALIZABLE on ``key``: counts executions, holds the lock ``sleep`` s (or until
        ``gate`` opens)."""
        r = side(app)
        execution = int(r.incr(f"exec:{key}"))
        r.set(f"holder:{key}", os.getpid())
        if gate:
            wait_for_gate(app, gate)
        time.sleep(sleep)
        return {"key": key, "execution": execution, "pid": os.getpid()}

    @task(app=app, name="rel.early_acked", acks_late=False)
    def early_acked(key: str, gate: str = "") -> dict[str, Any]:
        """Acknowledged when it starts (Celery's default): counts its executions of ``key``,
        waits for ``gate`` if given, and returns which execution produced the value."""
        execution = int(side(app).incr(f"exec:{key}"))
        if gate:
            wait_for_gate(app, gate)
        return {"key": key, "execution": execution, "pid": os.getpid()}

    @task(
        app=app,
        name="rel.fenced",
        cache_policy=INPUTS - "gate",
        cache_expiration=600,
        acks_late=True,
        reject_on_worker_lost=True,
    )
    def fenced(key: str, gate: str) -> dict[str, Any]:
        """Counts its executions of ``key``, waits for ``gate``, and returns (and caches) which
        execution produced the value."""
        execution = int(side(app).incr(f"exec:{key}"))
        wait_for_gate(app, gate)
        return {"key": key, "execution": execution, "pid": os.getpid()}

    @task(app=app, name="rel.blocked_in_redis", timeout_seconds=0.1)
    def blocked_in_redis(key: str, seconds: float) -> str:
        """Spends ``seconds`` inside one Redis call (a BLPOP on an empty list)."""
        side(app).blpop(key, timeout=seconds)
        return "returned"

    @task(app=app, name="rel.retry_once", retries=1, retry_delay_seconds=2, acks_late=False)
    def retry_once(key: str) -> int:
        """Fails its first execution of ``key`` (a countdown retry follows), then succeeds.

        Counts on the broker: the outage tests stop the backend while it runs."""
        execution = int(broker_side(app).incr(f"exec:{key}"))
        if execution == 1:
            raise ValueError(f"{key}: execution 1 fails")
        return execution

    @app.task(name="rel.plain_retry_once", bind=True, max_retries=1, acks_late=False, shared=False)
    def plain_retry_once(self: Any, key: str) -> int:
        """``retry_once`` as a plain Celery task: the same retry shape, without the engine."""
        execution = int(broker_side(app).incr(f"exec:{key}"))
        if execution == 1:
            raise self.retry(countdown=2)
        return execution

    @task(app=app, name="rel.tiny", acks_late=True, reject_on_worker_lost=True)
    def tiny(i: int, sleep: float = 0.0) -> int:
        time.sleep(sleep)
        return i * 2

    # Acknowledged on receipt (Celery's default): no redelivery repairs what the run wrote.
    @task(app=app, name="rel.ends_after", acks_late=False)
    def ends_after(marker: str, sleep: float) -> str:
        """Says it is about to end (sets ``marker``), then ends ``sleep`` s later."""
        side(app).set(marker, os.getpid())
        time.sleep(sleep)
        return marker

    @task(app=app, name="rel.ends_after_async", acks_late=False)
    async def ends_after_async(marker: str, sleep: float) -> str:
        """:func:`ends_after` as an ``async def`` task."""
        side(app).set(marker, os.getpid())
        await asyncio.sleep(sleep)
        return marker

    @task(app=app, name="rel.ends_after_generator", acks_late=False)
    def ends_after_generator(marker: str, sleep: float) -> Iterator[str]:
        """:func:`ends_after` as a generator task (yields ``marker`` once it is done)."""
        side(app).set(marker, os.getpid())
        time.sleep(sleep)
        yield marker

    @task(app=app, name="rel.ends_after_async_generator", acks_late=False)
    async def ends_after_async_generator(marker: str, sleep: float) -> AsyncIterator[str]:
        """:func:`ends_after` as an async generator task."""
        side(app).set(marker, os.getpid())
        await asyncio.sleep(sleep)
        yield marker

    @task(
        app=app,
        name="rel.soak",
        retries=2,
        retry_delay_seconds=[0.05, 0.2],
        retry_jitter_factor=0.5,
        timeout_seconds=SOAK_TIMEOUT,
        cache_policy=INPUTS,
        cache_expiration=SOAK_CACHE_EXPIRATION,
        acks_late=True,
        reject_on_worker_lost=True,
    )
    def soak(token: str, failures: int, timeouts: int, sleep: float) -> str:
        """Fails its first ``failures`` executions of ``token``, then times out (sleeps past
        its limit) the next ``timeouts``, then sleeps ``sleep`` s and returns."""
        execution = int(side(app).incr(f"exec:{token}"))
        if execution <= failures:
            raise ValueError(f"{token}: execution {execution} fails")
        if execution <= failures + timeouts:
            time.sleep(1.0)
        time.sleep(sleep)
        return token

    return SimpleNamespace(
        **{t.name.split(".", 1)[1]: t for t in app.tasks.values() if t.name.startswith("rel.")}
    )


def _apply_lock_ttl() -> None:
    ttl = os.environ.get("RELIABILITY_LOCK_TTL")
    if ttl:
        transactions.LOCK_TTL_SECONDS = float(ttl)


@task_prerun.connect
def _log_delivery(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    """Log each delivery a worker starts: ``start <task id> <retries> <redelivered> <pid>``."""
    if _logged(sender):
        request = sender.request
        redelivered = int(bool((request.delivery_info or {}).get("redelivered")))
        entry = f"start {task_id} {int(request.retries or 0)} {redelivered} {os.getpid()}"
        side(sender.app).rpush(DELIVERIES, entry)


@task_postrun.connect
def _log_delivery_end(
    sender: Any = None, task_id: str | None = None, state: str | None = None, **_: Any
) -> None:
    """Log each delivery a worker ends: ``end <task id> <Celery state> <pid>``."""
    if _logged(sender):
        side(sender.app).rpush(DELIVERIES, f"end {task_id} {state} {os.getpid()}")


def _logged(sender: Any) -> bool:
    # rel.tiny runs by the hundred in the fault tests, where Redis itself fails: not logged.
    return sender is not None and sender.name in _LOGGED_TASKS


_LOGGED_TASKS = frozenset(
    {"rel.work", "rel.gated", "rel.flaky", "rel.locked", "rel.soak"}
    | {"rel.early_acked", "rel.fenced"}
)


_apply_lock_ttl()
app, tasks = make_app(
    os.environ.get("RELIABILITY_BROKER_URL", "redis://127.0.0.1:6379/0"),
    os.environ.get("RELIABILITY_BACKEND_URL") or None,
    os.environ.get("RELIABILITY_QUEUE", "rel"),
    visibility_timeout=float(
        os.environ.get("RELIABILITY_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT)
    ),
)
if os.environ.get("RELIABILITY_BACKEND_MAX_RETRIES"):
    app.conf.result_backend_transport_options["retry_policy"] = {
        "max_retries": int(os.environ["RELIABILITY_BACKEND_MAX_RETRIES"]),
        "interval_max": 1,
    }
