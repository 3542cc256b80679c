"""A real registry (distribution v2.8, Debian's ``docker-registry``) on a free port, owned by the test run.

Filesystem storage in a temp dir, deletes enabled; started with
``docker-registry serve CONFIG.yml`` and stopped by PID. Without the binary the
fixture uses ``REGMW_TEST_REGISTRY_URL`` (then ``root`` is None), else skips
(fails under ``REGMW_REQUIRE_SERVICES=1``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from ._util import free_port, stop, unavailable, wait_for_port

CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
"""


@dataclass
class DockerRegistry:
    url: str
    port: int
    root: Path | None
    proc: subprocess.Popen | None = None


def _start(binary: str, root: Path, config: Path, log: Path, procs: list[subprocess.Popen],
           extra_config: str = "") -> DockerRegistry:
    """Start ``docker-registry serve`` on a free port with storage under ``root``; return once it listens.

    ``extra_config``: more top-level YAML sections (``auth:``). The process is appended to ``procs``
    before the wait, so the caller stops it even when the wait fails.
    """
    root.mkdir(parents=True)
    port = free_port()
    config.write_text(CONFIG.format(root=root, port=port) + extra_config)
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT)
    procs.append(proc)
    wait_for_port(port, proc=proc)
    return DockerRegistry(f"http://127.0.0.1:{port}", port, root, proc)


@pytest.fixture
def make_docker_registry(tmp_path):
    """``make_docker_registry(extra_config="")`` starts one more fresh ``docker-registry`` (own root and port).

    For tests that need several upstreams (the old/new catalog), a clean one per
    run (conformance), or one configured otherwise (``extra_config``: top-level YAML
    sections, e.g. token ``auth:``). Needs the binary: no URL fallback, since one URL is one registry.
    """
    binary = shutil.which("docker-registry")
    procs: list[subprocess.Popen] = []

    def start(extra_config: str = "") -> DockerRegistry:
        if binary is None:
            unavailable("docker-registry not on PATH (apt-get install docker-registry)")
        base = tmp_path / f"registry-{len(procs)}"
        return _start(binary, base / "storage", base / "registry.yml", base / "registry.log", procs, extra_config)

    yield start
    for proc in procs:
        stop(proc)


@pytest.fixture
def docker_registry(tmp_path):
    """A fresh ``docker-registry`` with its own storage root; killed at teardown."""
    binary = shutil.which("docker-registry")
    if binary is None:
        url = os.environ.get("REGMW_TEST_REGISTRY_URL")
        if not url:
            unavailable("docker-registry not on PATH (apt-get install docker-registry) and REGMW_TEST_REGISTRY_URL unset")
        yield DockerRegistry(url.rstrip("/"), int(url.rsplit(":", 1)[1].split("/")[0]), None)
        return
    procs: list[subprocess.Popen] = []
    try:
        yield _start(binary, tmp_path / "registry-storage", tmp_path / "registry.yml", tmp_path / "registry.log",
                     procs)
    finally:
        for proc in procs:
            stop(proc)
