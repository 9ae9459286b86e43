"""The project's client side, run as a script: uses the library's tasks before and after the
project's app exists, and prints what it saw as JSON."""

from __future__ import annotations

import json

from tests.idioms import library

from celery_taskengine import ConfigurationError  # isort: skip


def main() -> None:
    seen: dict[str, object] = {"local_before_app": library.add(2, 3)}
    try:
        library.add.delay(1, 2)
        seen["sent_before_app"] = "sent"
    except ConfigurationError as exc:
        seen["sent_before_app"] = f"refused: {exc}"
    from tests.idioms.project import app

    seen["bound_to_project"] = library.add.app is app and library.mul.app is app
    seen["add"] = library.add.delay(2, 3).get(timeout=30)
    seen["mul"] = library.mul.delay(3, 4).get(timeout=30)
    result = library.whoami.delay()
    seen["whoami_is_its_id"] = result.get(timeout=30) == result.id
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
