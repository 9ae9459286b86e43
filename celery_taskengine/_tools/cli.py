"""The ``celery-taskengine`` command (also ``python -m celery_taskengine``).

::

    celery-taskengine demo                                   the embedded quickstart, no Redis
    celery-taskengine -A proj runs ls [--task T] [--state S] [--limit N]
    celery-taskengine -A proj runs show ID                   one run's state history
    celery-taskengine -A proj cache ls [--task T]            committed cache keys
    celery-taskengine -A proj cache clear (--task T | --key K | --all)

``-A``/``--app`` names the Celery app exactly as ``celery -A`` does (``proj``, ``proj.app``,
``proj:app``); without it, ``CELERY_TASKENGINE_APP`` is used. Runs and cache records are read
from the app's own store (see the README's Deployments). Failures the user can act on (no app,
an app without a shared store, the store not answering, an unknown run id, a state that is no
state) print one line on stderr and exit with status 1; usage errors exit with 2, as argparse
does.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from celery import Celery
from kombu.utils.url import maybe_sanitize_url

from celery_taskengine import __version__, states
from celery_taskengine._engine.task_run import TaskRun
from celery_taskengine._store.protocol import ResultRecord, ResultStore
from celery_taskengine._store.run_filters import squash, task_matches
from celery_taskengine._store.selection import store_for_app
from celery_taskengine._store.settings import configured_store_url
from celery_taskengine._tools.cli_app import APP_ENV_VAR, CommandError, load_app
from celery_taskengine._tools.cli_store import add_store_commands
from celery_taskengine._tools.timeline import format_duration, format_timeline
from celery_taskengine.errors import StoreUnavailableError
from celery_taskengine.states import StateType

__all__ = ["APP_ENV_VAR", "CommandError", "build_parser", "main"]

#: How many runs ``runs ls`` shows unless told otherwise.
DEFAULT_LIMIT = 20


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except CommandError as exc:
        print(f"celery-taskengine: error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each leaf command stores its handler as ``handler``."""
    parser = argparse.ArgumentParser(
        prog="celery-taskengine",
        description="Inspect task runs and cached results of a celery-taskengine app.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_app_option(parser, default=None)
    parser.set_defaults(handler=_no_command(parser))
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the embedded quickstart (no Redis needed)")
    demo.set_defaults(handler=_demo)
    _add_runs_commands(commands)
    _add_cache_commands(commands)
    add_store_commands(commands, _add_app_option)
    return parser


def _add_app_option(parser: argparse.ArgumentParser, *, default: Any) -> None:
    parser.add_argument(
        "-A",
        "--app",
        default=default,
        metavar="APP",
        help=f"the Celery app, as for `celery -A` (module, module.attr or module:attr); "
        f"default: ${APP_ENV_VAR}",
    )


def _add_runs_commands(commands: Any) -> None:
    runs = commands.add_parser("runs", help="task run records")
    runs.set_defaults(handler=_no_command(runs))
    sub = runs.add_subparsers(title="commands", metavar="COMMAND")

    ls = sub.add_parser("ls", help="recent runs, the most recently active first")
    _add_app_option(ls, default=argparse.SUPPRESS)
    ls.add_argument("--task", metavar="NAME", help="only runs of this task (full or short name)")
    ls.add_argument(
        "--state",
        metavar="NAME",
        help="only runs in this state: a name (TimedOut) or type (FAILED)",
    )
    ls.add_argument("--limit", type=_positive_int, default=DEFAULT_LIMIT, metavar="N")
    ls.set_defaults(handler=_with_store(_runs_ls))

    show = sub.add_parser("show", help="one run: its parameters and state history")
    _add_app_option(show, default=argparse.SUPPRESS)
    show.add_argument("run_id", metavar="ID", help="the run id (the Celery task id)")
    show.set_defaults(handler=_with_store(_runs_show))


def _add_cache_commands(commands: Any) -> None:
    cache = commands.add_parser("cache", help="committed cache records")
    cache.set_defaults(handler=_no_command(cache))
    sub = cache.add_subparsers(title="commands", metavar="COMMAND")

    ls = sub.add_parser("ls", help="cache keys, with their task and expiry")
    _add_app_option(ls, default=argparse.SUPPRESS)
    ls.add_argument("--task", metavar="NAME", help="only records of this task")
    ls.set_defaults(handler=_with_store(_cache_ls))

    clear = sub.add_parser("clear", help="remove cache records")
    _add_app_option(clear, default=argparse.SUPPRESS)
    which = clear.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", metavar="NAME", help="every record of this task")
    which.add_argument("--key", metavar="KEY", help="the record under this key")
    which.add_argument("--all", action="store_true", help="every record of the app")
    clear.set_defaults(handler=_with_store(_cache_clear))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _no_command(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return handler


def _demo(args: argparse.Namespace) -> int:
    from celery_taskengine._tools import demo

    return demo.main()


# -- the app and its store ---------------------------------------------------------------


def _with_store(
    command: Callable[[ResultStore, argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """A handler that loads the app, opens its Redis store and runs ``command`` on it."""

    def handler(args: argparse.Namespace) -> int:
        store = open_store(load_app(args.app))
        with _store_answering(store.url):
            return command(store, args)

    return handler


def open_store(app: Celery) -> ResultStore:
    """The app's shared store; :class:`CommandError` when its records live in process memory."""
    named = configured_store_url(app) or str(app.conf.result_backend)
    with _store_answering(maybe_sanitize_url(named)):
        store = store_for_app(app)
    if not store.shared:
        raise CommandError(
            f"app {app.main!r} has no Redis result backend, no database one and no "
            f"taskengine_store setting (result_backend = {app.conf.result_backend!r}): its "
            f"runs and cache records live only in the process that made them"
        )
    return store


@contextmanager
def _store_answering(url: str) -> Iterator[None]:
    """Turn "the store is not answering" into a one-line :class:`CommandError` naming it."""
    try:
        yield
    except StoreUnavailableError as exc:
        text = str(exc.__cause__ or exc).strip()
        cause = (text.splitlines() or [text])[0]
        kind = "Redis" if _REDIS_URL.match(url) else "the SQL store"
        raise CommandError(f"{kind} at {url} is not answering: {cause}") from exc


#: URL schemes of Redis stores (as Celery spells their backends).
_REDIS_URL = re.compile(r"^(redis|rediss|sentinel|socket|unix)\b")


# -- runs ----------------------------------------------------------------------------------

#: What ``--state`` takes: the name of a state (``TimedOut``, one constructor of
#: :mod:`~celery_taskengine.states` each) or a type (``FAILED``).
_STATE_NAMES = (
    *(name for name in states.__all__ if name[0].isupper() and not name.startswith("State")),
    *(state_type.value for state_type in StateType),
)
_STATE_WORDS = frozenset(squash(name) for name in _STATE_NAMES)


def _runs_ls(store: ResultStore, args: argparse.Namespace) -> int:
    runs = store.list_runs(args.limit, task=args.task, state=args.state)
    if not runs:
        print("no runs" + _filters_note(args))
        if args.state is not None and squash(args.state) not in _STATE_WORDS:
            known = ", ".join(_STATE_NAMES)  # a typo must not read as "none failed"
            note = f"note: --state {args.state!r} is no state the engine gives ({known})"
            print(f"{note}; a state a task names itself matches too", file=sys.stderr)
        return 0
    rows = [
        [run.id, run.task_name, run.state_name or "-", str(run.run_count), _last_change(run)]
        for run in runs
    ]
    _print_table(["ID", "TASK", "STATE", "RUN_COUNT", "LAST CHANGE (UTC)"], rows)
    return 0


def _runs_show(store: ResultStore, args: argparse.Namespace) -> int:
    run = store.load_run(args.run_id)
    if run is None:
        raise CommandError(f"no run with id {args.run_id!r} (in {store.url})")
    state = run.state
    fields = [
        ("run", run.id),
        ("task", run.task_name),
        ("name", run.name),
        ("state", f"{state.name} ({state.type.value})" if state is not None else "-"),
        ("run_count", str(run.run_count)),
        ("tags", ", ".join(sorted(run.tags)) or "-"),
        ("started", _time(run.start_time)),
        ("ended", _ended(run)),
        ("parameters", _parameters(run)),
    ]
    if state is not None and state.message:
        fields.append(("message", state.message))
    if state is not None and state.type is StateType.COMPLETED and state.data is not None:
        fields.append(("result", repr(state.data)))
    for label, value in fields:
        print(f"{label:<11} {value}")
    print("\nstate history")
    for line in format_timeline(run):
        print(line)
    return 0


def _filters_note(args: argparse.Namespace) -> str:
    given = (("--task", args.task), ("--state", args.state))
    chosen = [f"{flag} {value}" for flag, value in given if value is not None]
    return f" matching {' '.join(chosen)}" if chosen else ""


# -- cache ---------------------------------------------------------------------------------


def _cache_ls(store: ResultStore, args: argparse.Namespace) -> int:
    rows = []
    for key in store.iter_keys():
        record = store.read(key)
        task_name = _record_task(key, record)
        if args.task is not None and not task_matches(task_name, args.task):
            continue
        created = _time(record.created_at) if record is not None else "-"
        expires = _expiry(record)
        rows.append([key, task_name or "-", created, expires])
    if not rows:
        print("no cache records" + (f" of task {args.task}" if args.task else ""))
        return 0
    _print_table(["KEY", "TASK", "CREATED (UTC)", "EXPIRES (UTC)"], rows)
    print(f"{_count(len(rows), 'cache record')}")
    return 0


def _cache_clear(store: ResultStore, args: argparse.Namespace) -> int:
    if args.key is not None:
        removed = int(store.delete(args.key))
        print(f"removed {_count(removed, 'cache record')} (key {args.key!r})")
        return 0
    keys = store.iter_keys()
    if args.task is not None:
        keys = [k for k in keys if task_matches(_record_task(k, store.read(k)), args.task)]
    removed = sum(store.delete(key) for key in keys)
    scope = f"of task {args.task}" if args.task is not None else "of every task"
    print(f"removed {_count(removed, 'cache record')} {scope}")
    return 0


def _record_task(key: str, record: ResultRecord | None) -> str | None:
    """The task that wrote a record: from the record, else from a policy key's scope."""
    if record is not None and record.task_name:
        return record.task_name
    # Keys computed by cache policies are scoped as "<task name>/<digest>".
    return key.split("/", 1)[0] if "/" in key else None


def _expiry(record: ResultRecord | None) -> str:
    if record is None:
        return "-"
    return _time(record.expires_at) if record.expires_at is not None else "never"


# -- output --------------------------------------------------------------------------------


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _time(moment: datetime | None) -> str:
    """A moment in UTC to the millisecond, or ``-``."""
    if moment is None:
        return "-"
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _last_change(run: TaskRun) -> str:
    return _time(run.state_history[-1].timestamp if run.state_history else run.start_time)


def _ended(run: TaskRun) -> str:
    if run.end_time is None or run.start_time is None:
        return _time(run.end_time)
    took = (run.end_time - run.start_time).total_seconds()
    return f"{_time(run.end_time)} (took {format_duration(took)})"


def _parameters(run: TaskRun) -> str:
    if not run.parameters:
        return "-"
    return ", ".join(f"{name}={value!r}" for name, value in run.parameters.items())
