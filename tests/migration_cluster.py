"""A migration cluster for the worker tests and the benchmark: Redis, `regmw serve`, `regmw worker` processes.

Every part is real and separate: a throwaway redis-server, ``regmw serve``
(the reference registry's old and new roots behind the middleware), N
``regmw worker`` processes (dramatiq on that Redis) and a webhook receiver the
notifications plugin delivers ``migrated`` events to. All share one TOML file,
as in production.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from .servers._util import free_port, stop, wait_for_port

REPO_ROOT = Path(__file__).resolve().parent.parent
LAYOUT = "docker/registry/v2"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def write_toml(path: Path, config: dict[str, dict[str, Any]]) -> None:
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))


def regmw_binary() -> str:
    return str(Path(sys.executable).parent / "regmw")


class Cluster:
    """The processes of one run; ``close()`` stops every one of them by PID."""

    def __init__(self, tmp: Path, redis_url: str, *, plugins: list[str], sections: dict[str, dict[str, Any]]) -> None:
        self.tmp = tmp
        self.root = tmp / "registry"
        self.root.mkdir(exist_ok=True)
        self.redis = redis.Redis.from_url(redis_url)
        self.namespace = f"mig{os.getpid()}"
        self.config_path = tmp / "regmw.toml"
        config: dict[str, dict[str, Any]] = {
            "regmw": {"plugins": plugins, "entry_points": False, "log_level": "WARNING"},
            "redis": {"url": redis_url, "namespace": self.namespace, "socket_timeout": 2.0},
            "storage": {"root": str(self.root)},
        }
        if "migration" in plugins:
            config["migration"] = {"old_root": f"old/{LAYOUT}", "new_root": f"new/{LAYOUT}"}
        for name, values in sections.items():
            config[name] = {**config.get(name, {}), **values}
        self.jobs_namespace = config.get("jobs", {}).get("namespace", f"{self.namespace}-jobs")
        write_toml(self.config_path, config)
        self.env = {**os.environ, "REGMW_TEST_REGISTRY_ROOT": str(self.root), "REGMW_CONFIG": "",
                    "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.server: subprocess.Popen | None = None
        self.port = 0
        self.workers: list[subprocess.Popen] = []

    def regmw(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([regmw_binary(), *args, "-c", str(self.config_path)], capture_output=True, text=True,
                              timeout=timeout, env=self.env, cwd=REPO_ROOT, check=False)

    def serve(self) -> int:
        self.port = free_port()
        self.server = subprocess.Popen(
            [regmw_binary(), "serve", "-c", str(self.config_path), "--port", str(self.port),
             "--app", "tests.servers.migration_apps:create()"],
            env=self.env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, 20, proc=self.server)
        return self.port

    def start_worker(self, threads: int = 2) -> subprocess.Popen:
        log = open(self.tmp / f"worker-{len(self.workers)}.log", "wb")
        proc = subprocess.Popen([regmw_binary(), "worker", "-c", str(self.config_path), "--threads", str(threads)],
                                env=self.env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.workers.append(proc)
        return proc

    def migration_state(self, repository: str) -> dict | None:
        raw = self.redis.hget(f"{self.jobs_namespace}:regmw:state:migration:{repository}", "value")
        return json.loads(raw) if raw else None

    def new_repository_dir(self, repository: str) -> Path:
        return self.root / "new" / LAYOUT / "repositories" / repository

    def old_repository_dir(self, repository: str) -> Path:
        return self.root / "old" / LAYOUT / "repositories" / repository

    def close(self) -> None:
        for proc in [*self.workers, *([self.server] if self.server else [])]:
            stop(proc)


def wait_until(condition, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def tree(top: Path) -> dict[str, bytes]:
    out = {}
    for folder, _, files in os.walk(top):
        for name in files:
            path = Path(folder) / name
            relative = str(path.relative_to(top))
            if not relative.startswith("_uploads"):
                out[relative] = path.read_bytes()
    return out
