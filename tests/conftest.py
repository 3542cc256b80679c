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

pytest_plugins = [
    f"tests.servers.{module.name}"
    for module in pkgutil.iter_modules([str(Path(__file__).parent / "servers")])
    if not module.name.startswith("_")
]
