"""The package's layers, checked on its source: who may import what.

The folders are the architecture. From the bottom: ``_engine`` (the run's state machine, its
steps and drivers), ``_store`` (every store and the only code that talks to Redis or SQL),
``_celery`` (the task class, the producer, a worker's delivery), ``_tools`` (command line, demo,
timeline); the public modules (``__init__``, ``task_engine``, ``states``, ...) sit on top, and
the vocabulary every layer shares (``states``, ``errors``, ``cache_policies``,
``transactions``) is public too. Rules, read from the import statements of every module (an
AST walk; an import inside a function or under ``TYPE_CHECKING`` counts as much as one at the
top, except for the import-time rule):

- only ``_store`` talks to Redis: no other module imports ``redis``;
- nothing imports upward: ``_engine`` imports nothing from ``_store``, ``_celery`` or
  ``_tools`` at import time; ``_store`` nothing from ``_celery`` or ``_tools``; ``_celery``
  nothing from ``_tools``; and no private package imports the package root's names;
- ``_engine`` imports no ``celery``, ``kombu`` or ``redis``;
- no import cycle: among the package's modules, counting every import that can run (at the
  top or inside a function; not those under ``TYPE_CHECKING``, which never run), no module
  reaches itself again;
- the engine core is pure: importing one of :data:`CORE_MODULES` imports no ``celery``,
  ``kombu``, ``redis`` or ``anyio``, directly or through the package modules it imports at
  import time (a function-level import, such as a transaction's ``with`` shell reaching for
  its driver, runs only when called; ``TYPE_CHECKING`` imports never run).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "celery_taskengine"
STORE = PACKAGE / "_store"

#: Modules (relative to the package) outside ``_store`` that import ``redis`` today. The store
#: rebuild (issue 11) took them off; nothing may be added.
KNOWN_REDIS_IMPORTERS: frozenset[str] = frozenset()

#: Each private package, from the bottom up: a package may import only those below it.
LAYERS = ("_engine", "_store", "_celery", "_tools")
#: What ``_engine`` must not import, at any level.
NOT_IN_ENGINE = ("celery", "kombu", "redis")


#: The engine core: the run's decisions, its steps, states, records, keys and transactions.
CORE_MODULES: frozenset[str] = frozenset(
    {
        "_engine.core_cache",
        "_engine.core_env",
        "_engine.core_outcomes",
        "_engine.core_states",
        "_engine.observers",
        "_engine.parameters",
        "_engine.pydantic_args",
        "_engine.retry_policy",
        "_engine.run_core",
        "_engine.run_scope",
        "_engine.steps",
        "_engine.task_run",
        "_engine.transaction_keys",
        "_engine.transaction_scope",
        "cache_policies",
        "errors",
        "states",
        "transactions",
    }
)
#: What the core must not import when it is imported.
NOT_IN_CORE = ("celery", "kombu", "redis", "anyio")


def modules(root: Path) -> Iterator[Path]:
    yield from sorted(root.rglob("*.py"))


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, dotted name)`` of every module ``path`` imports, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield from names_of_import(node, package)


def names_of_import(node: ast.Import | ast.ImportFrom, package: str) -> Iterator[tuple[int, str]]:
    """``(line, dotted name)`` of what one import statement in ``package`` names; ``from
    celery_taskengine import task`` names the module ``task``, too."""
    if isinstance(node, ast.Import):
        yield from ((node.lineno, alias.name) for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        parent = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*parent, base] if base else parent)
    yield node.lineno, base
    yield from ((node.lineno, f"{base}.{alias.name}") for alias in node.names)


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


def layer_of(path: Path) -> str | None:
    """The private package ``path`` is in (``None``: a public module)."""
    first = path.relative_to(PACKAGE).parts[0]
    return first if first in LAYERS else None


def layer_of_name(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "celery_taskengine" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def upward_imports(*, import_time_only: bool) -> list[str]:
    """Imports of a private package from a package above it, ``path line: name`` each."""
    found = []
    for path in modules(PACKAGE):
        layer = layer_of(path)
        if layer is None:
            continue
        walk = import_time_modules if import_time_only else imported_modules
        for line, name in walk(path):
            target = layer_of_name(name)
            if target is not None and LAYERS.index(target) > LAYERS.index(layer):
                found.append(f"{path.relative_to(PACKAGE)} line {line}: {name}")
    return found


def test_no_private_package_imports_one_above_it() -> None:
    # _engine may reach a store's lease plumbing from inside a driver's function only.
    engine_at_import = [f for f in upward_imports(import_time_only=True) if f.startswith("_engine")]
    others = [f for f in upward_imports(import_time_only=False) if not f.startswith("_engine")]
    assert not engine_at_import + others, "imports upward:\n" + "\n".join(engine_at_import + others)


def test_the_upward_walk_would_see_an_upward_import() -> None:
    # Given the rule reads import statements, a module of the store naming the bridge is seen.
    assert layer_of_name("celery_taskengine._celery.task") == "_celery"
    assert LAYERS.index("_celery") > LAYERS.index("_store")


def test_no_private_package_imports_the_package_roots_names() -> None:
    root_names = {
        f"celery_taskengine.{alias.name}"
        for node in ast.walk(ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    found = [
        f"{path.relative_to(PACKAGE)} line {line}: {name}"
        for path in modules(PACKAGE)
        if layer_of(path) in ("_engine", "_store", "_celery")
        for line, name in imported_modules(path)
        if name in root_names and module_path(name) is None
    ]
    assert not found, "private modules import the package root:\n" + "\n".join(found)


def test_the_engine_package_imports_no_celery_kombu_or_redis() -> None:
    found = [
        f"{path.relative_to(PACKAGE)} line {line}: {name}"
        for path in modules(PACKAGE / "_engine")
        for line, name in imported_modules(path)
        if name.split(".")[0] in NOT_IN_ENGINE
    ]
    assert not found, "_engine imports Celery, kombu or redis:\n" + "\n".join(found)


def import_time_modules(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, dotted name)`` of what importing ``path`` imports: module-level statements,
    outside functions and ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending.extend(node.orelse)
        elif isinstance(node, ast.If | ast.Try | ast.With):
            for block in ("body", "orelse", "finalbody", "handlers"):
                pending.extend(getattr(node, block, []))
        elif isinstance(node, ast.ExceptHandler):
            pending.extend(node.body)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            yield from names_of_import(node, package)


def module_path(name: str) -> Path | None:
    """The file of package module ``name`` (dotted), or ``None`` (a name inside a module)."""
    relative = name.split(".")[1:]
    if not relative:
        return None  # the package's __init__: the public surface, not part of the core
    as_module = PACKAGE.joinpath(*relative).with_suffix(".py")
    if as_module.exists():
        return as_module
    as_package = PACKAGE.joinpath(*relative, "__init__.py")
    return as_package if as_package.exists() else None


def import_time_closure(module: str) -> dict[str, list[str]]:
    """Every module importing ``celery_taskengine.<module>`` imports, with who imports it."""
    seen: dict[str, list[str]] = {}
    todo = [f"celery_taskengine.{module}"]
    done: set[str] = set()
    while todo:
        current = todo.pop()
        path = module_path(current)
        if current in done or path is None:
            continue
        done.add(current)
        for line, name in import_time_modules(path):
            seen.setdefault(name, []).append(f"{path.relative_to(PACKAGE)} line {line}")
            if name.startswith("celery_taskengine."):
                todo.append(name)
    return seen


def test_the_import_time_walk_sees_the_drivers_anyio() -> None:
    # Given the drivers await with anyio, a walk that misses it would prove nothing.
    assert "anyio" in import_time_closure("_engine.drivers")


def test_the_import_time_walk_skips_type_checking_and_function_imports() -> None:
    seen = import_time_closure("transactions")
    assert "celery_taskengine._engine.drivers" not in seen  # imported inside the shell methods
    assert "celery_taskengine._store.protocol" not in seen  # under TYPE_CHECKING


@pytest.mark.parametrize("module", sorted(CORE_MODULES))
def test_importing_a_core_module_imports_no_celery_kombu_redis_or_anyio(module: str) -> None:
    found = {
        name: where
        for name, where in import_time_closure(module).items()
        if name.split(".")[0] in NOT_IN_CORE
    }
    assert not found, f"celery_taskengine.{module} imports at import time: {found}"


def runnable_imports(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, dotted name)`` of every import in ``path`` that can run: at the top or inside
    a function, but not under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield from names_of_import(node, package)
        pending.extend(ast.iter_child_nodes(node))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_import_graph() -> dict[str, set[str]]:
    """Each package module, and the package modules it can import (itself left out)."""
    graph: dict[str, set[str]] = {}
    for path in modules(PACKAGE):
        name = module_name(path)
        targets = {module_path(imported) for _line, imported in runnable_imports(path)}
        graph[name] = {module_name(t) for t in targets if t is not None} - {name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    cycles.append(sorted(group))
    return cycles


def test_no_import_cycle_among_the_packages_modules() -> None:
    cycles = import_cycles(package_import_graph())
    assert not cycles, (
        "modules that import each other (directly or around a circle):\n"
        + "\n".join(" <-> ".join(cycle) for cycle in cycles)
    )


def test_the_cycle_walk_sees_a_cycle_and_function_level_imports() -> None:
    # Given a circle closed by an import inside a function, the walk reports it.
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
    graph = package_import_graph()
    # _celery/task.py imports worker_delivery only inside Task.__call__.
    assert "celery_taskengine._celery.worker_delivery" in graph["celery_taskengine._celery.task"]
    # _store/local_records.py imports redis_store only under TYPE_CHECKING.
    assert (
        "celery_taskengine._store.redis_store"
        not in graph["celery_taskengine._store.local_records"]
    )
