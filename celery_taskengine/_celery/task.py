"""The ``@task`` decorator and ``Task``: a real Celery task that runs through the engine."""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from datetime import datetime
from typing import Any, ClassVar, Literal, TypeVar, overload

from celery import Celery
from celery.app.task import Task as CeleryTask
from celery.result import AsyncResult
from celery.utils.functional import head_from_fun

from celery_taskengine._celery import cancellation, events, worker_checks, worker_signals  # noqa: F401
from celery_taskengine._celery import producer as producer_side
from celery_taskengine._celery.celery_request import (
    delivered_request,
    engine_request,
    lineage,
    request_retry,
)
from celery_taskengine._celery.engine_backend import for_engine_tasks
from celery_taskengine._celery.option_checks import check_references
from celery_taskengine._celery.options import (
    HOOK_OPTIONS,
    TaskOptions,
    build_options,
    split_celery_options,
)
from celery_taskengine._celery.shared_tasks import refuse_unconfigured_default
from celery_taskengine._celery.shared_tasks import shared_task as _shared
from celery_taskengine._engine.parameters import bind_parameters
from celery_taskengine._engine.pydantic_args import arguments_for_sending
from celery_taskengine._engine.run_scope import current_task_run
from celery_taskengine.task_engine import runner_for

__all__ = ["Task", "fn_kind", "shared_task", "task"]

F = TypeVar("F", bound=Callable[..., Any])

FnKind = Literal["function", "coroutine", "generator", "async_generator"]


def fn_kind(fn: Callable[..., Any]) -> FnKind:
    """Which runner a function needs."""
    if inspect.isasyncgenfunction(fn):
        return "async_generator"
    if inspect.isgeneratorfunction(fn):
        return "generator"
    if inspect.iscoroutinefunction(fn):
        return "coroutine"
    return "function"


class Task(CeleryTask):  # type: ignore[misc]
    """A Celery task whose body runs through the engine.

    ``t(...)`` runs here (states, retries, timeouts, hooks, cache); ``t.delay(...)`` sends it
    to a worker, where the same engine runs. Celery sees an ordinary task (routing, canvas,
    Flower, ``celery inspect registered``).
    """

    engine_options: ClassVar[TaskOptions]
    #: Set to the task's ``retries``: the engine asks for every retry, and Celery's retry
    #: count (the message's) never exceeds the engine's attempts.
    max_retries: ClassVar[int | None] = None
    fn_kind: ClassVar[FnKind] = "function"
    celery_options: ClassVar[dict[str, Any]] = {}
    #: The decorated function as given (``run`` is it bound to the task with ``bind=True``).
    engine_fn: ClassVar[Callable[..., Any]]
    #: Whether the function takes the task as its first argument (``bind=True``).
    bound: ClassVar[bool] = False
    #: Set, so Celery's autoretry never wraps an engine task: its options are engine retries.
    _orig_run: ClassVar[Any] = None
    _source_text: str | None = None
    #: The worker's request class: shows AWAITING-RETRY to monitors for the whole wait.
    Request = "celery_taskengine._celery.worker_request:EngineRequest"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """``@app.task(base=Task)`` and ``@shared_task(base=Task)``: Celery builds the class
        with every option as an attribute; they are validated here, at decoration, as
        ``@task`` validates them."""
        super().__init_subclass__(**kwargs)
        namespace = cls.__dict__
        if namespace.get("_decorated") and "engine_options" not in namespace:
            _from_celery_decorator(cls)

    @property
    def fn(self) -> Callable[..., Any]:
        """The decorated function."""
        return self.run  # type: ignore[no-any-return]

    @property
    def isasync(self) -> bool:
        return self.fn_kind in ("coroutine", "async_generator")

    def source_text(self) -> str:
        """The function's source (for TASK_SOURCE keys), read once."""
        if self._source_text is None:
            try:
                text = inspect.getsource(self.run)
            except (OSError, TypeError):
                code = getattr(self.run, "__code__", None)
                text = repr(code.co_code) if code is not None else repr(self.run)
            self._source_text = text
        return self._source_text

    def __call__(
        self, *args: Any, return_state: bool = False, wait_for: Any = None, **kwargs: Any
    ) -> Any:
        if worker_signals.take_delivery(self):
            # Celery's worker is calling us for a message (marked at task_prerun): bridge it.
            from celery_taskengine._celery.worker_delivery import run_delivery

            return run_delivery(self, args, kwargs)
        parameters = bind_parameters(self.run, args, kwargs)
        return_type: Literal["state", "result"] = "state" if return_state else "result"
        return runner_for(self.fn_kind)(self, None, None, parameters, wait_for, return_type)

    @property
    def request(self) -> Any:
        """Celery's request; while this task's function runs, the run's (see celery_request)."""
        run = current_task_run()
        stacked = self.request_stack.top
        if run is None or run.task_name != self.name:
            return stacked if stacked is not None else self._get_request()
        return engine_request(self, run, stacked or delivered_request())

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: datetime | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        """Celery's ``retry``; inside this task's run, an engine retry (``RetryRequested``)."""
        run = current_task_run()
        if run is None or run.task_name != self.name:
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        unsupported = {"args": args, "kwargs": kwargs, **options}
        return request_retry(
            self,
            run,
            exc=exc,
            throw=throw,
            eta=eta,
            countdown=countdown,
            max_retries=max_retries,
            unsupported={k: v for k, v in unsupported.items() if v is not None},
        )

    @property
    def backend(self) -> Any:
        """The app's result backend (or the task's own), storing a claimed delivery's outcome
        only while it holds its claim (see :mod:`~celery_taskengine._celery.engine_backend`)."""
        return for_engine_tasks(self._backend or self.app.backend)

    @backend.setter
    def backend(self, value: Any) -> None:
        self._backend = value

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Celery's ``apply_async`` (and so ``delay``), plus two checks before publishing.

        Arguments the serializer cannot encode raise ``SerializationError`` naming the
        argument; a result already cached under a key that needs no run id is returned at
        once as a ready :class:`~celery_taskengine._celery.producer.CachedResult`, publishing
        nothing.
        """
        refuse_unconfigured_default(self)
        producer_side.refuse_local_only(self, kwargs, options)
        options.update(
            task_id=task_id, producer=producer, link=link, link_error=link_error, shadow=shadow
        )
        for name, value in lineage(self.app).items():  # sent from a run's other thread
            options.setdefault(name, value)
        if self.engine_options.pydantic is not None:  # validated here: bad ones raise now
            dump = options.get("serializer", self.serializer) != "pickle"
            args, kwargs = arguments_for_sending(self, args, kwargs, dump=dump)
        return producer_side.apply_async(self, super().apply_async, args, kwargs, options)

    def with_options(self, **options: Any) -> Task:
        """A copy with some options changed; the original is unchanged.

        The copy is registered with the app only under a new ``name``; under the same name it
        runs locally with the new options and sends to workers as the original.
        """
        engine_given, celery_given = split_celery_options(options)
        new_options = self.engine_options.with_changes(self.run, **engine_given)
        merged_celery = {**self.celery_options, **celery_given}
        renamed = "name" in engine_given and engine_given["name"] != self.name
        return build_task(
            self.app,
            self.engine_fn,
            new_options,
            merged_celery,
            name=engine_given["name"] if renamed else self.name,
            register=renamed,
            bind=self.bound,
            base=type(self).__bases__[0],
        )

    def __repr__(self) -> str:
        return f"<@task {self.name} of {self.app.main or 'default'}>"


@overload
def task(__fn: F) -> Task: ...


@overload
def task(
    __fn: None = None,
    *,
    app: Celery | None = None,
    base: type[Task] | None = None,
    **options: Any,
) -> Callable[[F], Task]: ...


def task(
    __fn: Callable[..., Any] | None = None,
    *,
    app: Celery | None = None,
    base: type[Task] | None = None,
    **options: Any,
) -> Task | Callable[[Callable[..., Any]], Task]:
    """Make ``fn`` an engine task and a Celery task of ``app``.

    Without ``app``, as Celery's ``@shared_task``: every app registers it, and the name is a
    proxy to the current app's task (see shared_tasks). Options are validated now: a bad
    value raises ``TypeError``/``ValueError`` naming it. Engine options are those of Prefect's
    ``@task``; Celery's retry options are translated into them (see celery_retries); any other
    Celery task option (``queue``, ``acks_late``, ``rate_limit``, ...) passes through to Celery.
    ``bind=True`` passes the task as the function's first argument, as in Celery. ``base``: a
    subclass of :class:`Task` whose methods (``on_success``, ``on_failure``, ...) Celery calls
    as usual.
    """
    bind = _checked_bind_and_base(options.pop("bind", False), base)
    engine_given, celery_given = split_celery_options(options)

    def decorate(fn: Callable[..., Any]) -> Task:
        if not callable(fn):
            raise TypeError(f"@task decorates a function, got {type(fn).__name__}")
        check_references(fn, {**engine_given, **celery_given})
        engine_options = build_options(fn, engine_given)
        name = engine_given.get("name")
        if app is None:
            return _shared(
                fn, engine_options, celery_given, name=name, bind=bind, base=base, build=build_task
            )
        name = name or app.gen_task_name(fn.__name__, getattr(fn, "__module__", None) or "__main__")
        return build_task(
            app, fn, engine_options, celery_given, name=name, register=True, bind=bind, base=base
        )

    if __fn is not None:
        return decorate(__fn)
    return decorate


def _checked_bind_and_base(bind: Any, base: Any) -> bool:
    if not isinstance(bind, bool):
        raise TypeError(f"task option 'bind' must be True or False, got {bind!r}")
    if base is not None and not (isinstance(base, type) and issubclass(base, Task)):
        raise TypeError(f"task option 'base' must subclass celery_taskengine.Task, got {base!r}")
    return bind


#: Celery's name for the same decorator: ``@task`` without ``app=`` already behaves like it.
shared_task = task


def _header(fn: Callable[..., Any], bind: bool = False) -> Callable[..., Any]:
    """Celery's argument checker for ``fn``. Celery builds it by ``exec`` of a ``def`` with the
    function's name, which a lambda's ``<lambda>`` is not: its code gets a usable name."""
    name = getattr(fn, "__name__", "")
    if isinstance(fn, types.FunctionType) and not name.isidentifier():
        renamed = types.FunctionType(
            fn.__code__, fn.__globals__, "anonymous", fn.__defaults__, fn.__closure__
        )
        renamed.__kwdefaults__ = fn.__kwdefaults__
        fn = renamed
    header: Callable[..., Any] = head_from_fun(fn, bound=bind)
    return header


def build_task(
    app: Celery,
    fn: Callable[..., Any],
    options: TaskOptions,
    celery_options: dict[str, Any],
    *,
    name: str,
    register: bool,
    bind: bool = False,
    base: type[Task] | None = None,
) -> Task:
    """Build the Celery task class for ``fn`` and, if asked, register it with ``app``.

    Unlike ``app.task``, a new function under a name already taken replaces the old task, so
    re-decorating (tests, notebooks) never silently keeps stale options.
    """
    attributes = _class_attributes(app, fn, options, celery_options, name=name, bind=bind)
    cls: Any = type(getattr(fn, "__name__", name), (base or Task,), attributes)
    instance: Task = cls()
    if register:
        app._tasks[name] = instance
    cls.bind(app)
    return instance


def _class_attributes(
    app: Celery,
    fn: Callable[..., Any],
    options: TaskOptions,
    celery_options: dict[str, Any],
    *,
    name: str,
    bind: bool,
) -> dict[str, Any]:
    """The task class's namespace: Celery's attributes, the engine's, and the Celery options."""
    return {
        "app": app,
        "name": name,
        "run": fn if bind else staticmethod(fn),
        "engine_fn": staticmethod(fn),
        "bound": bind,
        "_decorated": True,
        "__doc__": fn.__doc__,
        "__module__": getattr(fn, "__module__", __name__),
        "__qualname__": getattr(fn, "__qualname__", name),
        "__wrapped__": fn,
        "__header__": staticmethod(_header(fn, bind)),
        "engine_options": options,
        "fn_kind": fn_kind(fn),
        "celery_options": dict(celery_options),
        # Celery never retries an engine task more often than the engine would (the engine
        # asks for each retry; this bounds a message whose run record went missing).
        "max_retries": options.retry_limit,
        **celery_options,
    }


#: What Celery's decorator puts in a task class besides the options.
_CELERY_MADE = frozenset(
    {"app", "name", "run", "_decorated", "_dump_pydantic_arguments", "_decorated_fun"}
)


def _from_celery_decorator(cls: Any) -> None:
    """Give a class Celery's decorator built on :class:`Task` its engine options."""
    namespace = cls.__dict__
    run = namespace["run"]
    bind = not isinstance(run, staticmethod)
    fn = run.__func__ if isinstance(run, staticmethod) else run
    given = {
        key: value
        for key, value in namespace.items()
        if key not in _CELERY_MADE and not key.startswith("__")
    }
    engine_given, celery_given = split_celery_options(given)
    engine_given["name"] = namespace["name"]
    check_references(fn, given)
    options = build_options(fn, engine_given)
    for hook in HOOK_OPTIONS:
        if hook in namespace:
            delattr(cls, hook)  # on_failure=[...] are engine hooks, not Celery's method
    cls.engine_options = options
    cls.engine_fn = staticmethod(fn)
    cls.fn_kind = fn_kind(fn)
    cls.bound = bind
    cls.celery_options = celery_given
    cls.max_retries = options.retry_limit
