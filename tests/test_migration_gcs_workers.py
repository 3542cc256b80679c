"""Repositories on GCS (the emulator) migrated by 2 `regmw worker` processes on a real Redis; one SIGKILLed mid-copy.

The workers reach the emulator over loopback, copy with ``objects.rewrite``
and keep their state in Redis; the killed worker's repository is finished by
the other one. Every object ends under the new root byte-identical, and every
repository is marked new in the shared (Redis) classification cache.
"""
from __future__ import annotations

import hashlib
import os
import signal

import pytest

import regmw

from .migration_cluster import Cluster, wait_until
from .servers.redis_server import start_redis
from .servers._util import stop

pytestmark = pytest.mark.services

OLD, NEW = "old/docker/registry/v2", "new/docker/registry/v2"
REPOSITORIES = [f"gcs/app{index}" for index in range(8)]


def objects_of(name: str, size: int) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for data in (os.urandom(size), os.urandom(size // 2), name.encode() * 10):
        hex_ = hashlib.sha256(data).hexdigest()
        out[f"{OLD}/blobs/sha256/{hex_[:2]}/{hex_}/data"] = data
        out[f"{OLD}/repositories/{name}/_layers/sha256/{hex_}/link"] = f"sha256:{hex_}".encode()
    out[f"{OLD}/repositories/{name}/_manifests/tags/v1/current/link"] = b"sha256:" + b"0" * 64
    return out


def test_gcs_repositories_migrated_by_two_workers_one_killed(tmp_path, gcs_emulator):
    proc, port = start_redis(tmp_path)
    namespace = f"gmig{os.getpid()}"
    sections = {
        "gcs": gcs_emulator.gcs_section(timeout=10.0),
        "migration": {"old_root": OLD, "new_root": NEW},
        "migration_job": {"drain": 0.3, "lock_ttl": 3.0},
        "jobs": {"namespace": f"{namespace}-jobs", "heartbeat_timeout": 2.0, "maintenance_chance": 0.3,
                 "min_backoff": 0.2, "max_backoff": 1.0},
    }
    cluster = Cluster(tmp_path, f"redis://127.0.0.1:{port}/0", plugins=["redis", "gcs", "migration", "jobs"],
                      sections=sections)
    bucket = gcs_emulator.client.bucket(gcs_emulator.bucket)
    seeded: dict[str, bytes] = {}
    for name in REPOSITORIES:
        seeded.update(objects_of(name, 400_000))
    for key, data in seeded.items():
        bucket.blob(key).upload_from_string(data)
    try:
        workers = [cluster.start_worker(threads=1) for _ in range(2)]
        enqueued = cluster.regmw("migrate", *REPOSITORIES)
        assert enqueued.returncode == 0, enqueued.stderr
        killed = []

        def caught() -> bool:
            for name in REPOSITORIES:
                state = cluster.migration_state(name)
                if state and state["phase"] == "locked" and any(
                        True for _ in gcs_emulator.client.list_blobs(gcs_emulator.bucket,
                                                                   prefix=f"{NEW}/repositories/{name}/")):
                    pid = int(state["owner"].split(":")[2])
                    victim = next((w for w in workers if w.pid == pid and w.poll() is None), None)
                    if victim is not None:
                        victim.send_signal(signal.SIGKILL)
                        victim.wait()
                        killed.append(name)
                        return True
            return False

        try:
            wait_until(caught, 60, "a worker mid-copy", interval=0.01)
        except AssertionError:
            raise AssertionError({n: cluster.migration_state(n) for n in REPOSITORIES}) from None
        wait_until(lambda: all((cluster.migration_state(n) or {}).get("phase") == "done" for n in REPOSITORIES),
                   90, "every repository migrated", interval=0.2)
    finally:
        cluster.close()
    runtime = regmw.build(str(cluster.config_path), environ={})
    try:
        for key, data in seeded.items():
            assert bucket.blob(NEW + key[len(OLD):]).download_as_bytes() == data, key
        classifier = runtime.services.classifier
        for name in REPOSITORIES:
            assert runtime.services.cache.get(classifier.cache_key(name)) == b"new"
        assert killed and cluster.migration_state(killed[0])["phase"] == "done"
    finally:
        stop(proc)
