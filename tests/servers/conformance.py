"""The OCI distribution-spec conformance suite (v1.0.1), run against a registry URL.

The suite is built and run by ``shared/conformance/run.sh`` (next to the
repository: ``../shared``, or any parent's ``shared/``; or the path in
``REGMW_CONFORMANCE_RUN``), which builds it offline from Debian's Go packages
(installed by tools/test-setup.sh) and caches the binary, so only the first run
of a machine builds (~20 s) and each later run takes about a second. Missing
script or a suite that does not build: skip, or fail under
``REGMW_REQUIRE_SERVICES=1``.
"""
from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ._util import unavailable

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ConformanceResult:
    ran: int
    passed: int
    failed: set[str] = field(default_factory=set)
    log: str = ""

    def __str__(self) -> str:
        return f"{self.passed} of {self.ran} passed; failed: {sorted(self.failed) or 'none'}"


def find_run_script() -> Path | None:
    explicit = os.environ.get("REGMW_CONFORMANCE_RUN")
    if explicit:
        return Path(explicit)
    for parent in REPO_ROOT.parents:
        candidate = parent / "shared" / "conformance" / "run.sh"
        if candidate.is_file():
            return candidate
    return None


def parse_log(text: str) -> ConformanceResult:
    ran = re.search(r"Ran (\d+) of \d+ Specs", text)
    passed = re.search(r"(\d+) Passed \| (\d+) Failed", text)
    if ran is None or passed is None:
        raise AssertionError(f"the conformance suite printed no summary:\n{text[-3000:]}")
    failed = {line[len("[Fail] "):].strip() for line in text.splitlines() if line.startswith("[Fail] ")}
    result = ConformanceResult(int(ran.group(1)), int(passed.group(1)), failed, text)
    assert len(failed) == int(passed.group(2)), "every failed spec has a [Fail] line"
    return result


@pytest.fixture
def conformance(tmp_path) -> Callable[..., ConformanceResult]:
    """``conformance(url, **env) -> ConformanceResult`` for one run of the suite against ``url``."""
    script = find_run_script()
    if script is None:
        unavailable("shared/conformance/run.sh not found beside the repository (set REGMW_CONFORMANCE_RUN)")
    runs = iter(range(1000))

    def run(url: str, **env: str) -> ConformanceResult:
        out = tmp_path / f"conformance-{next(runs)}"
        result = subprocess.run(["bash", str(script), url, str(out)], capture_output=True, text=True,
                                timeout=900, env={**os.environ, **env}, check=False)
        if "conformance suite did not build" in result.stdout or not (out / "run.log").is_file():
            unavailable(f"the conformance suite could not be built or run:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        return parse_log((out / "run.log").read_text(errors="replace"))

    return run
