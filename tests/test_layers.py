"""The package's layers, checked on its source: who may import what.

Two rules, read from the import statements of every module (an AST walk, so an import inside
a function or under ``TYPE_CHECKING`` counts as much as one at the top):

- only the store package, ``celery_taskengine/_store/``, talks to Redis: no other module
  imports ``redis`` (``import redis``, ``import redis.x``, ``from redis... import ...``);
- the store sits below the Celery bridge: nothing in ``_store`` imports a bridge module.

Known current violations are listed in :data:`KNOWN_REDIS_IMPORTERS`, printed by the test, so
that the rule is enforced for every other module today and the list can only shrink: a module
on it that no longer imports ``redis`` fails the test too, until it is taken off.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "celery_taskengine"
STORE = PACKAGE / "_store"

#: Modules (relative to the package) outside ``_store`` that import ``redis`` today. The store
#: rebuild (issue 11) takes them off; nothing may be added.
KNOWN_REDIS_IMPORTERS: frozenset[str] = frozenset()

#: The Celery bridge and the tools on top of it: the store must not depend on any of them.
BRIDGE_MODULES: frozenset[str] = frozenset(
    {
        "cancellation",
        "control_flow",
        "cli",
        "cli_store",
        "demo",
        "engine_backend",
        "events",
        "message_age",
        "producer",
        "streaming",
        "task",
        "worker_checks",
        "worker_loop",
        "worker_requeue",
        "worker_run",
    }
)


def modules(root: Path) -> Iterator[Path]:
    yield from sorted(root.rglob("*.py"))


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, dotted name)`` of every module ``path`` imports, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            yield node.lineno, base
            # ``from celery_taskengine import task`` imports the module ``task``, too.
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def redis_importers() -> dict[str, list[str]]:
    """Modules outside ``_store`` that import ``redis``, with where they do."""
    found: dict[str, list[str]] = {}
    for path in modules(PACKAGE):
        if STORE in path.parents:
            continue
        for line, name in imported_modules(path):
            if name == "redis" or name.startswith("redis."):
                found.setdefault(str(path.relative_to(PACKAGE)), []).append(f"line {line}")
    return found


def test_the_walk_sees_every_import_of_redis_in_the_store() -> None:
    # Given the store talks to Redis, a walk that finds no import there would prove nothing.
    in_store = {
        str(path.relative_to(PACKAGE))
        for path in modules(STORE)
        for _line, name in imported_modules(path)
        if name.split(".")[0] == "redis"
    }
    assert "_store/redis_store.py" in in_store, in_store


def test_no_module_outside_the_store_package_imports_redis() -> None:
    found = redis_importers()
    print(
        f"\nknown modules outside _store that still import redis: {sorted(KNOWN_REDIS_IMPORTERS)}"
    )
    new = {module: lines for module, lines in found.items() if module not in KNOWN_REDIS_IMPORTERS}
    assert not new, f"modules outside celery_taskengine/_store/ import redis: {new}"
    cleaned = sorted(KNOWN_REDIS_IMPORTERS - found.keys())
    assert not cleaned, f"no longer import redis, take them off KNOWN_REDIS_IMPORTERS: {cleaned}"


def test_the_store_package_imports_nothing_from_the_celery_bridge() -> None:
    bridge = {f"celery_taskengine.{name}" for name in BRIDGE_MODULES}
    found = [
        f"{path.relative_to(PACKAGE)} line {line}: {name}"
        for path in modules(STORE)
        for line, name in imported_modules(path)
        if name in bridge or any(name.startswith(f"{module}.") for module in bridge)
    ]
    assert not found, "the store imports the Celery bridge:\n" + "\n".join(found)
