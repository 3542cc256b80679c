"""Shared test plumbing.

Fixtures that start real servers live in ``tests/servers/*.py`` (one module per
server kind) and are loaded here as pytest plugins. A fixture that needs a
server binary starts its own when the binary is on PATH, else uses a URL from
the environment, else skips with the reason; ``REGMW_REQUIRE_SERVICES=1`` (set
by .ci/run) turns those skips into failures.
"""
from __future__ import annotations

import pkgutil
from pathlib import Path

import pytest

pytest_plugins = [
    f"tests.servers.{module.name}"
    for module in pkgutil.iter_modules([str(Path(__file__).parent / "servers")])
    if not module.name.startswith("_")
]


#: ``[jobs] queue_path``'s default: relative, so a test building a runtime without a queue path of its
#: own would leave the embedded queue's file in the working directory (the repository root)
_QUEUE_DEFAULT = "regmw-jobs.sqlite3"


@pytest.fixture(autouse=True)
def _no_job_queue_left_in_the_working_directory():
    """Fail the test that writes the default queue file where pytest runs (give ``[jobs] queue_path`` a tmp path)."""
    here = Path.cwd()

    def files() -> dict[str, int]:
        return {path.name: path.stat().st_mtime_ns for path in here.glob(_QUEUE_DEFAULT + "*")}

    before = files()
    yield
    assert files() == before, f"the test wrote {_QUEUE_DEFAULT} in {here}: give [jobs] queue_path a tmp path"
