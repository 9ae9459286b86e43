"""``celery-taskengine store ...``: set up the tables of a SQL store.

``store init`` creates them (the store also does on first use, where it may); ``store ddl``
prints the ``CREATE`` statements for a database whose schema only migrations change.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_store_commands"]


def add_store_commands(commands: Any, add_app_option: Any) -> None:
    """Add ``store init`` and ``store ddl`` to the CLI's ``commands``."""
    store = commands.add_parser("store", help="the engine's store: create SQL tables")
    sub = store.add_subparsers(title="commands", metavar="COMMAND", required=True)

    init = sub.add_parser("init", help="create the SQL store's tables where they are missing")
    add_app_option(init, default=argparse.SUPPRESS)
    init.add_argument("--url", metavar="URL", help="a database URL instead of the app's store")
    init.set_defaults(handler=_init)

    ddl = sub.add_parser("ddl", help="print the SQL store's CREATE statements")
    ddl.add_argument("--dialect", required=True, choices=["postgresql", "mysql", "sqlite"])
    ddl.set_defaults(handler=_ddl)


def _init(args: argparse.Namespace) -> int:
    from celery_taskengine._store.selection import store_for_app
    from celery_taskengine._tools.cli_app import CommandError, load_app
    from celery_taskengine.errors import TaskEngineError

    try:
        if args.url:
            from celery_taskengine._store.sql_store import SqlStore

            store: Any = SqlStore.from_url(args.url, create_tables=False)
        else:
            store = store_for_app(load_app(args.app))
        create = getattr(store, "create_tables", None)
        if create is None:
            print(f"{store.url}: nothing to create (the store needs no tables)")
            return 0
        create()
    except (TaskEngineError, ImportError) as exc:
        raise CommandError(str(exc)) from exc
    print(f"{store.url}: tables ready")
    return 0


def _ddl(args: argparse.Namespace) -> int:
    from celery_taskengine._store.sql_schema import ddl

    print(ddl(args.dialect), end="")
    return 0
