"""The ``celery-taskengine`` command against a real Redis: runs, cache, errors, and the demo.

Each test writes a small app module (as a user's ``proj`` would be) whose broker and result
backend are the test's Redis database, fills Redis by running its tasks through the engine
here, and calls ``cli.main([...])`` the way the console script does.
"""

from __future__ import annotations

import importlib
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from celery_taskengine._store.redis_store import RedisStore
from celery_taskengine._store.selection import store_for_app
from celery_taskengine._tools import cli
from celery_taskengine.task_engine import run_task_sync

REPO = Path(__file__).resolve().parent.parent
#: Seconds to wait for a local run's record to be copied to Redis.
RECORD_WAIT_SECONDS = 10.0

APP_SOURCE = """
from celery import Celery

from celery_taskengine import task
from celery_taskengine.cache_policies import INPUTS

app = Celery("cliapp", broker={url!r}, backend={url!r}, set_as_current=False)
_attempts = []


@task(app=app, retries=1, retry_delay_seconds=0.05)
def flaky(n: int) -> int:
    _attempts.append(n)
    if len(_attempts) == 1:
        raise ConnectionError("hiccup")
    return n


@task(app=app, cache_policy=INPUTS)
def square(n: int) -> int:
    return n * n


@task(app=app, cache_policy=INPUTS)
def cube(n: int) -> int:
    return n * n * n


@task(app=app)
def boom() -> None:
    raise ValueError("boom")
"""


def closed_port_url() -> str:
    """A Redis URL on a local port nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def write_app_module(directory: Path, url: str) -> str:
    name = f"cliapp_{uuid.uuid4().hex[:10]}"
    (directory / f"{name}.py").write_text(APP_SOURCE.format(url=url))
    return name


@pytest.fixture
def app_module(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ModuleType]:
    """A fresh user app module on the test's Redis database, importable by its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(cli.APP_ENV_VAR, raising=False)
    module = importlib.import_module(write_app_module(tmp_path, redis_url))
    try:
        yield module
    finally:
        sys.modules.pop(module.__name__, None)
        module.app.close()


def run(*argv: str) -> int:
    return cli.main(list(argv))


def store_of(module: ModuleType) -> RedisStore:
    store = store_for_app(module.app)
    assert isinstance(store, RedisStore)
    return store


def local_run(module: ModuleType, task_name: str, run_id: str, **parameters: Any) -> None:
    """Run a task of ``module`` here under ``run_id``, and wait until Redis has its final record.

    Local runs copy their record to Redis from a background thread; the CLI, like any other
    process, sees it once written.
    """
    run_task_sync(getattr(module, task_name), run_id, None, parameters, return_type="state")
    store = store_of(module)
    deadline = time.monotonic() + RECORD_WAIT_SECONDS
    while time.monotonic() < deadline:
        run = store.load_run(run_id)
        if run is not None and run.state is not None and run.state.is_final():
            return
        time.sleep(0.01)
    pytest.fail(f"the record of local run {run_id!r} did not reach Redis")


# -- runs show -----------------------------------------------------------------------------


def test_runs_show_prints_the_run_and_its_state_history_as_a_timeline(
    app_module: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a run that failed once, waited, retried and completed
    local_run(app_module, "flaky", "run-1", n=7)
    # When it is shown
    status = run("-A", app_module.__name__, "runs", "show", "run-1")
    # Then its fields and every state, with the time spent in each, are printed
    out = capsys.readouterr().out
    assert status == 0
    assert "run         run-1" in out
    assert f"task        {app_module.__name__}.flaky" in out
    assert "state       Completed (COMPLETED)" in out
    assert "run_count   2" in out
    assert "parameters  n=7" in out
    assert "result      7" in out
    timeline = out.split("state history\n", 1)[1].splitlines()
    names = [line.split()[2] for line in timeline]  # "+0.0 ms  Pending  0.1 ms ..."
    assert names == ["Pending", "Running", "AwaitingRetry", "Retrying", "Completed"]
    assert "retry scheduled in 50 ms" in timeline[2]
    assert timeline[0].split()[:2] == ["+0.0", "ms"]


def test_runs_show_of_a_failed_run_prints_its_failure_message(
    app_module: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    local_run(app_module, "boom", "run-2")
    assert run("-A", app_module.__name__, "runs", "show", "run-2") == 0
    out = capsys.readouterr().out
    assert "state       Failed (FAILED)" in out
    assert "message     Task run encountered an exception ValueError: boom" in out


def test_runs_show_of_an_unknown_id_says_there_is_no_such_run_and_exits_1(
    app_module: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    status = run("-A", app_module.__name__, "runs", "show", "no-such-id")
    captured = capsys.readouterr()
    assert status == 1
    assert "no run with id 'no-such-id'" in captured.err
    assert captured.out == ""


# -- runs ls -------------------------------------------------------------------------------


def test_runs_ls_lists_recent_runs_most_recent_first_with_their_state(
    app_module: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    local_run(app_module, "square", "first", n=2)
    local_run(app_module, "square", "second", n=2)
    assert run("-A", app_module.__name__, "runs", "ls") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "TASK", "STATE", "RUN_COUNT", "LAST", "CHANGE", "(UTC)"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["second", f"{app_module.__name__}.square", "Cached"],
        ["first", f"{app_module.__name__}.square", "Completed"],
    ]


def test_runs_ls_filters_by_task_and_state_given_by_name_or_type(
    app_module: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    local_run(app_module, "square", "sq", n=3)
    local_run(app_module, "cube", "cu", n=3)
    local_run(app_module, "boom", "bo")
    name = app_module.__name__

    def ids(*filters: str) -> list[str]:
        assert run("-A", name, "runs", "ls", *filters) == 0
        return [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]

    assert ids("--task", "cube") == ["cu"]
    assert ids("--task", f"{name}.square") == ["sq"]
    assert ids("--state", "failed") == ["bo"]
    assert sorted(ids("--state", "COMPLETED")) == ["cu", "sq"]
    assert ids("--task", "square", "--state", "Failed") == []


def test_runs_ls_says_so_when_nothing_matches(
    app_module: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("-A", app_module.__name__, "runs", "ls", "--state", "TimedOut") == 0
    assert capsys.readouterr().out == "no runs matching --state TimedOut\n"


def test_runs_ls_says_when_a_state_that_matches_nothing_is_no_state_the_engine_gives(
    app_module: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    local_run(app_module, "boom", "bo")
    assert run("-A", app_module.__name__, "runs", "ls", "--state", "faild") == 0
    captured = capsys.readouterr()
    assert captured.out == "no runs matching --state faild\n"  # a typo, not "none failed"
    assert "--state 'faild' is no state the engine gives" in captured.err
    assert "TimedOut" in captured.err and "FAILED" in captured.err
    assert run("-A", app_module.__name__, "runs", "ls", "--state", "TimedOut") == 0
    assert capsys.readouterr().err == ""  # a state that exists: no note


def test_an_unreachable_sql_store_is_named_as_sql_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = closed_port_url().rsplit(":", 1)[1].split("/")[0]
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/test"
    monkeypatch.syspath_prepend(str(tmp_path))
    name = write_app_module(tmp_path, "rpc://")
    (tmp_path / f"{name}.py").write_text(
        (tmp_path / f"{name}.py").read_text() + f"\napp.conf.taskengine_store = {url!r}\n"
    )
    try:
        status = run("-A", name, "runs", "ls")
    finally:
        sys.modules.pop(name, None)
    err = capsys.readouterr().err
    assert status == 1
    assert f"the SQL store at {url} is not answering" in err
    assert len(err.splitlines()) == 1


def test_runs_ls_shows_at_most_limit_runs(
    app_module: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    for n in range(4):
        local_run(app_module, "square", f"r{n}", n=n)
    assert run("-A", app_module.__name__, "runs", "ls", "--limit", "2") == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["r3", "r2"]


def test_runs_ls_refuses_a_limit_below_one(app_module: ModuleType) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run("-A", app_module.__name__, "runs", "ls", "--limit", "0")
    assert exit_info.value.code == 2


# -- cache ---------------------------------------------------------------------------------


def test_cache_ls_lists_the_keys_of_committed_results_with_their_task(
    app_module: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    app_module.square(2)
    app_module.square(3)
    app_module.cube(2)
    name = app_module.__name__
    assert run("-A", name, "cache", "ls") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["KEY", "TASK"]
    assert sorted(line.split()[1] for line in lines[1:-1]) == [
        f"{name}.cube",
        f"{name}.square",
        f"{name}.square",
    ]
    assert all(line.split()[0] in store_of(app_module).iter_keys() for line in lines[1:-1])
    assert lines[-1] == "3 cache records"

    assert run("-A", name, "cache", "ls", "--task", "cube") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[1:-1]] == [f"{name}.cube"]
    assert lines[-1] == "1 cache record"


def test_cache_clear_by_task_removes_only_that_tasks_records_and_says_how_many(
    app_module: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    app_module.square(2)
    app_module.square(3)
    app_module.cube(2)
    status = run("-A", app_module.__name__, "cache", "clear", "--task", "square")
    assert status == 0
    assert capsys.readouterr().out == "removed 2 cache records of task square\n"
    remaining = store_of(app_module).iter_keys()
    assert len(remaining) == 1 and remaining[0].startswith(f"{app_module.__name__}.cube/")
    # And the next call runs the function again instead of hitting the cache
    assert app_module.square(2, return_state=True).name == "Completed"


def test_cache_clear_by_key_removes_that_record(
    app_module: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    app_module.square(2)
    app_module.cube(2)
    key = store_of(app_module).iter_keys(f"{app_module.__name__}.cube/")[0]
    assert run("-A", app_module.__name__, "cache", "clear", "--key", key) == 0
    assert capsys.readouterr().out == f"removed 1 cache record (key {key!r})\n"
    assert run("-A", app_module.__name__, "cache", "clear", "--key", key) == 0
    assert capsys.readouterr().out == f"removed 0 cache records (key {key!r})\n"
    assert len(store_of(app_module).iter_keys()) == 1


def test_cache_clear_all_removes_every_record(
    app_module: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    app_module.square(2)
    app_module.cube(2)
    assert run("-A", app_module.__name__, "cache", "clear", "--all") == 0
    assert capsys.readouterr().out == "removed 2 cache records of every task\n"
    assert store_of(app_module).iter_keys() == []
    assert run("-A", app_module.__name__, "cache", "ls") == 0
    assert capsys.readouterr().out == "no cache records\n"


def test_cache_clear_needs_exactly_one_of_task_key_or_all(app_module: ModuleType) -> None:
    for argv in ([], ["--all", "--task", "square"]):
        with pytest.raises(SystemExit) as exit_info:
            run("-A", app_module.__name__, "cache", "clear", *argv)
        assert exit_info.value.code == 2


# -- finding the app and its store ---------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ":app", ".app"])
def test_the_app_is_found_as_celery_A_finds_it(
    app_module: ModuleType, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.load_app(app_module.__name__ + suffix) is app_module.app
    assert run("-A", app_module.__name__ + suffix, "runs", "ls") == 0
    assert capsys.readouterr().out == "no runs\n"


def test_the_app_option_may_also_follow_the_command(
    app_module: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("runs", "ls", "--app", app_module.__name__) == 0
    assert capsys.readouterr().out == "no runs\n"


def test_without_A_the_app_comes_from_the_environment(
    app_module: ModuleType, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cli.APP_ENV_VAR, app_module.__name__)
    assert run("cache", "ls") == 0
    assert capsys.readouterr().out == "no cache records\n"


def test_without_any_app_the_command_says_to_pass_A_and_exits_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(cli.APP_ENV_VAR, raising=False)
    assert run("runs", "ls") == 1
    err = capsys.readouterr().err
    assert "no Celery app given: pass -A/--app" in err
    assert cli.APP_ENV_VAR in err


def test_an_app_that_cannot_be_imported_is_reported_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run("-A", "no_such_module_for_cli_tests", "runs", "ls") == 1
    err = capsys.readouterr().err
    assert err.startswith("celery-taskengine: error: cannot load the Celery app")
    assert "No module named 'no_such_module_for_cli_tests'" in err
    assert len(err.splitlines()) == 1


def test_an_app_without_a_redis_backend_is_refused_with_a_clear_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run("-A", "celery_taskengine._tools.demo", "runs", "ls") == 1
    err = capsys.readouterr().err
    assert "app 'demo' has no Redis result backend" in err
    assert "'cache+memory://'" in err


@pytest.mark.parametrize(
    "command",
    [["runs", "ls"], ["runs", "show", "some-id"], ["cache", "ls"], ["cache", "clear", "--all"]],
)
def test_an_unreachable_redis_is_named_with_its_url_and_exits_1(
    command: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given an app whose Redis does not answer (a closed port)
    url = closed_port_url()
    monkeypatch.syspath_prepend(str(tmp_path))
    name = write_app_module(tmp_path, url)
    try:
        # When any command needs the store
        status = run("-A", name, *command)
    finally:
        sys.modules.pop(name, None)
    # Then it says which Redis is not answering, in one line, with status 1
    err = capsys.readouterr().err
    assert status == 1
    assert f"Redis at {url} is not answering" in err
    assert len(err.splitlines()) == 1


# -- as a program --------------------------------------------------------------------------


def run_program(
    *argv: str, cwd: Path = REPO, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery_taskengine", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def test_an_unreachable_redis_gives_a_message_not_a_traceback(tmp_path: Path) -> None:
    url = closed_port_url()
    name = write_app_module(tmp_path, url)
    done = run_program("-A", name, "runs", "ls", cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert f"Redis at {url} is not answering" in done.stderr


def test_the_console_script_is_installed_and_answers_version() -> None:
    script = Path(sys.executable).parent / "celery-taskengine"
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.startswith("celery-taskengine ")


def test_without_a_command_the_usage_is_printed_with_status_2() -> None:
    done = run_program()
    assert done.returncode == 2
    assert "usage: celery-taskengine" in done.stderr


def test_demo_runs_the_quickstart_in_process_and_exits_0() -> None:
    # No Redis at all: the demo brings its own in-memory broker and an in-process worker
    done = run_program("demo", timeout=90)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "returned {'id': 'inv-42', 'total': 42}" in out
    retried = history(out, "a retry with backoff")
    assert retried[:3] == ["Pending", "Running", "AwaitingRetry"]
    assert retried.count("Retrying") == 2 and retried[-1] == "Completed"
    assert history(out, "the same lookup again")[-1] == "Cached"
    assert history(out, "a timeout") == ["Pending", "Running", "TimedOut"]
    assert "Task run exceeded timeout of 0.3 second(s)" in out
    assert out.rstrip().endswith("done")


def history(out: str, title: str) -> list[str]:
    """The state names of the timeline the demo printed under ``title``."""
    section = out.split(f"\n{title}", 1)[1].split("\n\n", 1)[0]
    return [line.split()[2] for line in section.splitlines() if line.lstrip().startswith("+")]
