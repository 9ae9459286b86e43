"""``docker/``: the compose file and the worker image hold together, checked without Docker.

No Docker engine runs in the test environment, so these tests read the files: the services
exist and start in order, every command runs a module that exists in this repository, the
URLs point at the compose Redis, and the image copies what it needs and runs a real app.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from celery import Celery
from celery.app.utils import find_app

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"


@pytest.fixture(autouse=True)
def repo_importable(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """In the image, /app (the repository) is the working directory and on the path."""
    monkeypatch.syspath_prepend(str(REPO))
    yield


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    assert isinstance(command, list), "commands are exec-form lists: no shell in between"
    return [str(part) for part in command]


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the "KEY=value" form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def depends_on(service: dict[str, Any]) -> set[str]:
    deps = service.get("depends_on") or []
    return set(deps)  # a list of names or a mapping name -> condition


def worker_names(services: dict[str, dict[str, Any]]) -> list[str]:
    """Services whose command is a Celery worker."""
    return [name for name, svc in services.items() if "worker" in (svc.get("command") or [])]


def app_option(command: list[str]) -> str | None:
    """The value of ``-A``/``--app`` in a celery command line."""
    for index, part in enumerate(command):
        if part in ("-A", "--app"):
            return command[index + 1]
        if part.startswith("--app="):
            return part.split("=", 1)[1]
    return None


def assert_runs_in_this_repo(command: list[str]) -> None:
    """The command's program and modules exist here: ``celery -A app ...`` or ``python -m m``."""
    if command[0] == "celery":
        spec = app_option(command)
        assert spec is not None, f"{command}: celery without -A"
        assert isinstance(find_app(spec), Celery), f"{spec} is not a Celery app"
    elif command[0] in ("python", "python3"):
        assert command[1] == "-m", f"{command}: run examples as modules"
        assert importlib.util.find_spec(command[2]) is not None, f"no module {command[2]}"
    else:
        pytest.fail(f"unexpected program in {command}")


# -- compose.yml ---------------------------------------------------------------------------


def test_compose_has_redis_two_workers_flower_and_a_producer(
    services: dict[str, dict[str, Any]],
) -> None:
    assert {"redis", "flower", "producer"} <= set(services)
    assert len(worker_names(services)) >= 2
    assert services["redis"]["image"].startswith("redis:")


def test_every_service_but_redis_waits_for_a_healthy_redis(
    services: dict[str, dict[str, Any]],
) -> None:
    assert "healthcheck" in services["redis"]
    for name, service in services.items():
        if name == "redis":
            continue
        assert "redis" in depends_on(service), f"{name} does not depend on redis"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def test_the_producer_starts_after_the_workers(services: dict[str, dict[str, Any]]) -> None:
    assert set(worker_names(services)) <= depends_on(services["producer"])


def test_every_command_runs_an_app_or_module_that_exists_in_the_repository(
    services: dict[str, dict[str, Any]],
) -> None:
    commands = {name: command_of(svc) for name, svc in services.items() if name != "redis"}
    for command in commands.values():
        assert_runs_in_this_repo(command)
    assert commands["flower"][:4] == ["celery", "-A", "examples.shop", "flower"]
    assert commands["producer"] == ["python", "-m", "examples.shop"]


def test_workers_send_events_for_flower_and_have_distinct_names(
    services: dict[str, dict[str, Any]],
) -> None:
    workers = [command_of(services[name]) for name in worker_names(services)]
    assert all("-E" in command for command in workers)
    names = [command[command.index("-n") + 1] for command in workers]
    assert len(set(names)) == len(names)


def test_every_redis_url_points_at_the_redis_service(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name == "redis":
            continue
        env = environment_of(service)
        assert {"SHOP_BROKER_URL", "SHOP_BACKEND_URL"} <= set(env), name
        for key, value in env.items():
            if value.startswith("redis://"):
                url = urlparse(value)
                assert url.hostname == "redis" and url.port == 6379, f"{name} {key}={value}"


def test_the_urls_compose_sets_are_the_ones_the_shop_app_reads() -> None:
    source = (REPO / "examples" / "shop.py").read_text()
    assert 'os.environ.get("SHOP_BROKER_URL"' in source
    assert 'os.environ.get("SHOP_BACKEND_URL"' in source


def test_flower_api_is_opened_explicitly_and_published(
    services: dict[str, dict[str, Any]],
) -> None:
    flower = services["flower"]
    assert environment_of(flower)["FLOWER_UNAUTHENTICATED_API"] == "true"
    assert "5555:5555" in flower["ports"]


def test_every_built_service_builds_the_dockerfile_from_the_repository_root(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        if name == "redis":
            continue
        build = service["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == REPO, name
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE


# -- Dockerfile ----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def test_the_image_is_python_311_slim() -> None:
    assert dockerfile_instructions()[0] == ("FROM", "python:3.11-slim")


def test_the_image_copies_files_that_exist_and_installs_the_package() -> None:
    instructions = dockerfile_instructions()
    for instruction, arguments in instructions:
        if instruction == "COPY":
            *sources, _target = arguments.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: no such file in the repo"
    runs = " ".join(arguments for instruction, arguments in instructions if instruction == "RUN")
    assert "pip install ." in runs
    assert "flower" in runs


def test_the_image_cmd_is_a_worker_of_an_app_importable_from_the_repository() -> None:
    cmd = [args for instruction, args in dockerfile_instructions() if instruction == "CMD"]
    assert len(cmd) == 1
    command = json.loads(cmd[0])
    assert command == ["celery", "-A", "examples.shop", "worker", "-l", "info", "-E"]
    assert_runs_in_this_repo(command)
    assert "examples.shop.fetch_invoice" in find_app("examples.shop").tasks


def test_the_image_does_not_copy_the_virtualenv_or_git_metadata() -> None:
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)


def test_the_docker_readme_documents_compose_up() -> None:
    text = (DOCKER / "README.md").read_text()
    assert "docker compose -f docker/compose.yml up" in text


def test_examples_are_not_already_imported_from_elsewhere() -> None:
    # find_app above must import this repository's examples, not an installed namesake
    spec = importlib.util.find_spec("examples")
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).resolve().parent == REPO / "examples", sys.path[:3]
