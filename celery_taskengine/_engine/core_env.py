"""What the engine core is given: the task it runs and the environment the run executes in.

Pure: the store and the run's observers are only carried here and handed to the drivers
(``Record`` and cache steps); time and randomness are injectable so a test can fix them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from celery_taskengine._engine.observers import NO_OBSERVERS, RunObservers
from celery_taskengine.states import State, utcnow

if TYPE_CHECKING:
    from celery_taskengine._celery.options import TaskOptions
    from celery_taskengine._store.protocol import ResultStore

__all__ = ["EngineTask", "RunEnvironment"]

#: Jitter needs no cryptographic quality; one generator per process avoids seeding per run.
_SHARED_RNG = random.Random()


class EngineTask(Protocol):
    """What the core needs to know of a task."""

    name: str
    engine_options: TaskOptions

    @property
    def fn(self) -> Callable[..., Any]: ...

    def source_text(self) -> str: ...


@dataclass(slots=True)
class RunEnvironment:
    """What the place a run executes in provides: storage, recording, clock and policy."""

    store: ResultStore
    #: Told of every state the run enters (see observers): the run record, and in a worker its
    #: claim, Celery's task meta and events.
    observers: RunObservers = NO_OBSERVERS
    #: The id RUN_ID keys use: the Celery workflow root id in a worker, else the run's own id.
    key_run_id: str | None = None
    #: In a worker, a delayed retry ends this call in AwaitingRetry; the bridge re-queues it.
    defer_retries: bool = False
    is_cancelled: Callable[[], bool] | None = None
    clock: Callable[[], datetime] = utcnow
    monotonic: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=lambda: _SHARED_RNG)
    #: Runs of this task execute in several processes (a worker pool), so its locks must be
    #: seen by all of them: an in-process store cannot serve SERIALIZABLE there.
    across_processes: bool = False
    #: In a worker: the state an exception raised by the function ends the attempt in, never
    #: retried (Celery's ``Reject``/``Ignore``, see control_flow); ``None``: a failure.
    ends_attempt: Callable[[Exception], State | None] | None = None
