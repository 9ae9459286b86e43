"""The README's quickstart runs as written and prints what the README says it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(name: str) -> str:
    text = README.read_text()
    match = re.search(
        rf"<!-- readme-test: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.DOTALL
    )
    assert match, f"README has no block marked readme-test: {name}"
    return match.group(1)


def test_the_quickstart_runs_as_written_and_prints_the_documented_lines(tmp_path: Path) -> None:
    # Given the quickstart block, copied as a newcomer would
    script = tmp_path / "quickstart.py"
    code = readme_block("quickstart")
    script.write_text(code)
    # When it runs in a fresh interpreter
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    # Then it succeeds and prints every line its comments promise, in order
    assert done.returncode == 0, done.stderr
    promised = [
        line.strip()[2:].split("  (")[0].strip()
        for line in code.splitlines()
        if line.strip().startswith("# ")
    ]
    printed = [line.strip() for line in done.stdout.splitlines()]
    assert printed == promised


def test_the_architecture_section_names_every_module_of_the_package() -> None:
    # Given the package's modules as the tree holds them
    package = README.parent / "celery_taskengine"
    modules = {path.name for path in package.rglob("*.py") if path.name != "__init__.py"}
    folders = {path.parent.name for path in package.rglob("*.py") if path.parent != package}
    # When the README's Architecture section is read
    text = README.read_text()
    section = text[
        text.index("## Architecture\n") : text.index("\n## ", text.index("## Architecture\n") + 1)
    ]
    # Then it names each module and each folder
    missing = sorted(
        name for name in modules if f"`{name}`" not in section and f" {name}" not in section
    )
    assert not missing, f"the README's Architecture section does not name {missing}"
    assert all(f"{folder}/" in section for folder in folders), folders
