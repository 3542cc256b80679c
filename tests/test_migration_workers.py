"""50 repositories migrated by 3 `regmw worker` processes (dramatiq on a real Redis) under load, two SIGKILLs.

Real parts only: redis-server, `regmw serve` with the reference registry's
old and new roots, `regmw worker` processes, `regmw migrate` to enqueue, the
notifications plugin delivering to a webhook receiver, skopeo pulling.
Expected: every repository ends new and byte-identical, no acknowledged write
is lost (none was admitted while its repository migrated), no read fails,
exactly one `migrated` event per repository (one distinct id, delivered).
"""
from __future__ import annotations

import json
import os
import random
import signal
import threading

import pytest

from regmw.demo.client import DemoClient

from .migration_cluster import Cluster, tree, wait_until
from .servers.migration_apps import MANIFEST_TYPE, seed
from .servers.redis_server import start_redis
from .servers.webhook_receiver import SECRET
from .servers._util import stop
from .test_registry_e2e import skopeo  # noqa: F401 - the fixture

pytestmark = pytest.mark.services

REPOSITORIES = [f"team{index % 7}/app{index}" for index in range(50)]


@pytest.fixture
def cluster(tmp_path, webhook_receiver):
    proc, port = start_redis(tmp_path)
    receiver = webhook_receiver()
    namespace = f"mig{os.getpid()}"
    sections = {
        "migration_job": {"drain": 0.2, "lock_ttl": 3.0},
        "jobs": {"namespace": f"{namespace}-jobs", "heartbeat_timeout": 2.0, "maintenance_chance": 0.3,
                 "min_backoff": 0.2, "max_backoff": 1.0},
        "notifications": {
            "endpoints": [{"name": "hook", "url": receiver.url, "secrets": [SECRET], "actions": ["migrated"],
                           "timeout": 2.0, "retry_schedule": [0, 0.1, 0.2, 0.5]}],
            "allowed_networks": ["127.0.0.0/8"], "spool_dir": str(tmp_path / "spool"), "delivery_thread": "on",
            "lease_ttl": 1.0, "shards": 4,
        },
    }
    c = Cluster(tmp_path, f"redis://127.0.0.1:{port}/0", plugins=["redis", "migration", "jobs", "notifications"],
                sections=sections)
    c.receiver = receiver
    try:
        yield c
    finally:
        c.close()
        stop(proc)


class Load:
    """Readers and writers against `regmw serve` until stopped; records every outcome."""

    def __init__(self, port: int, repositories: list[str]) -> None:
        self.client = DemoClient("127.0.0.1", port)
        self.repositories = repositories
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.read_failures: list[str] = []
        self.reads = 0
        self.acknowledged: list[tuple[str, str, bytes]] = []
        self.refused = 0
        self.unexpected: list[str] = []
        self.threads = [threading.Thread(target=self.reader, args=(i,)) for i in range(2)]
        self.threads += [threading.Thread(target=self.writer, args=(i,)) for i in range(2)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def reader(self, seed_: int) -> None:
        rng = random.Random(seed_)
        while not self.stop.is_set():
            repository = rng.choice(self.repositories)
            manifest = self.client.request("GET", f"/v2/{repository}/manifests/v1", headers={"Accept": MANIFEST_TYPE})
            ok = manifest.status == 200
            if ok:
                layer = json.loads(manifest.body)["layers"][0]["digest"]
                blob = self.client.request("GET", f"/v2/{repository}/blobs/{layer}")
                ok = blob.status == 200
            with self.lock:
                self.reads += 1
                if not ok:
                    self.read_failures.append(f"{repository}: {manifest.status} {manifest.body[:200]!r}")

    def writer(self, seed_: int) -> None:
        rng = random.Random(100 + seed_)
        count = 0
        while not self.stop.is_set():
            repository = rng.choice(self.repositories)
            count += 1
            tag, layer = f"w{seed_}-{count}", os.urandom(2000)
            answers = self.client.push_image(repository, tag, layer)
            last = answers[-1]
            with self.lock:
                if len(answers) == 3 and last.status == 201:
                    self.acknowledged.append((repository, tag, layer))
                elif last.status == 503 and last.error_code == "UNAVAILABLE" and "retry-after" in last.headers:
                    self.refused += 1
                else:
                    self.unexpected.append(f"{repository} {tag}: {last.status} {last.body[:200]!r}")


def test_fifty_repositories_three_workers_two_sigkills_under_load(cluster, tmp_path, skopeo):  # noqa: F811
    rng = random.Random(12)
    seeded = {name: seed(str(cluster.root), name, rng.randrange(100_000, 1_500_000))
              for name in REPOSITORIES}
    before = {name: tree(cluster.old_repository_dir(name)) for name in REPOSITORIES}
    port = cluster.serve()
    workers = [cluster.start_worker() for _ in range(3)]
    load = Load(port, REPOSITORIES)
    load.start()
    try:
        enqueued = cluster.regmw("migrate", *REPOSITORIES)
        assert enqueued.returncode == 0, enqueued.stderr
        assert enqueued.stdout.count("\tqueued\t") == 50

        killed: list[tuple[str, int]] = []
        while len(killed) < 2:  # SIGKILL a worker caught mid-copy (locked, new side partly written), twice
            def caught() -> bool:
                for name in REPOSITORIES:
                    state = cluster.migration_state(name)
                    if state and state["phase"] == "locked" and cluster.new_repository_dir(name).exists():
                        pid = int(state["owner"].split(":")[2])
                        victim = next((w for w in workers if w.pid == pid and w.poll() is None), None)
                        if victim is not None:
                            victim.send_signal(signal.SIGKILL)
                            victim.wait()
                            killed.append((name, pid))
                            workers.remove(victim)
                            workers.append(cluster.start_worker())
                            return True
                return False

            wait_until(caught, 60, "a worker mid-copy", interval=0.005)

        def all_done() -> bool:
            return all((cluster.migration_state(name) or {}).get("phase") == "done" for name in REPOSITORIES)

        wait_until(all_done, 120, "every repository migrated", interval=0.2)
    finally:
        load.finish()

    status = cluster.regmw("migrate", "status")
    assert status.returncode == 0 and "done=50" in status.stdout.splitlines()[-1], status.stdout[-2000:]

    client = DemoClient("127.0.0.1", port)
    for name in REPOSITORIES:  # new, and everything the old side held is there byte for byte
        assert client.request("GET", f"/v2/{name}/tags/list").headers.get("regmw-migration-path") == "new"
        old, new = before[name], tree(cluster.new_repository_dir(name))
        missing = {k for k in old if new.get(k) != old[k] and not k.startswith("_manifests/tags/v1/")}
        assert not missing, f"{name}: {sorted(missing)[:5]}"
        assert client.pull_layer(name, "v1") == seeded[name].layer
    for name in rng.sample(REPOSITORIES, 3):  # a real client pulls a sample: the pushed digests
        out = tmp_path / "pulled" / name.replace("/", "_")
        out.parent.mkdir(exist_ok=True)
        skopeo(f"docker://127.0.0.1:{port}/{name}:v1", f"oci:{out}:v1")
        index = json.loads((out / "index.json").read_text())
        assert index["manifests"][0]["digest"] == seeded[name].manifest_digest
    assert load.read_failures == [], load.read_failures[:5]
    assert load.unexpected == [], load.unexpected[:5]
    for name, tag, layer in load.acknowledged:  # no acknowledged write was lost to the migration
        assert client.pull_layer(name, tag) == layer, f"{name}:{tag} lost"
    assert len(killed) == 2 and load.reads > 0 and load.acknowledged

    def delivered() -> dict[str, set[str]]:
        ids: dict[str, set[str]] = {}
        for event in cluster.receiver.snapshot():
            if event["action"] == "migrated":
                ids.setdefault(event["target"]["repository"], set()).add(event["id"])
        return ids

    wait_until(lambda: len(delivered()) == 50, 30, "a migrated event for every repository", interval=0.1)
    events = delivered()
    assert sorted(events) == sorted(REPOSITORIES)
    assert all(len(ids) == 1 for ids in events.values()), {k: v for k, v in events.items() if len(v) > 1}
    print(f"reads={load.reads} writes acknowledged={len(load.acknowledged)} refused(503)={load.refused} "
          f"killed={killed}")
