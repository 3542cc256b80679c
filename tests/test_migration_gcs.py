"""The migration and purge jobs on GCS (the emulator): server-side copies, nothing downloaded.

Every HTTP request the storage's client sends is logged: the migration must
copy with ``objects.rewrite`` and download no object's content (``alt=media``),
and the purge must delete stale upload sessions judged by listing metadata.
"""
from __future__ import annotations

import hashlib
import threading
import time

import pytest

import regmw
from regmw import hookimpl
from regmw.defaults.purge import purge
from regmw.jobs import JobContext
from regmw_migration.migrate import JOB_NAME
from tests.servers.gcs_emulator import count_requests

pytestmark = pytest.mark.services

OLD, NEW = "old/docker/registry/v2", "new/docker/registry/v2"


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def emit(self, event: dict) -> None:
        self.events.append(event)


def put_repository(emulator, name: str, blobs: list[bytes]) -> dict[str, bytes]:
    """Objects of one repository in the distribution layout under OLD; returns key -> bytes."""
    objects: dict[str, bytes] = {}
    for data in blobs:
        hex_ = hashlib.sha256(data).hexdigest()
        objects[f"{OLD}/blobs/sha256/{hex_[:2]}/{hex_}/data"] = data
        objects[f"{OLD}/repositories/{name}/_layers/sha256/{hex_}/link"] = f"sha256:{hex_}".encode()
    manifest = b'{"schemaVersion":2,"name":"' + name.encode() + b'"}'
    hex_ = hashlib.sha256(manifest).hexdigest()
    objects[f"{OLD}/blobs/sha256/{hex_[:2]}/{hex_}/data"] = manifest
    objects[f"{OLD}/repositories/{name}/_manifests/revisions/sha256/{hex_}/link"] = f"sha256:{hex_}".encode()
    objects[f"{OLD}/repositories/{name}/_manifests/tags/v1/current/link"] = f"sha256:{hex_}".encode()
    bucket = emulator.client.bucket(emulator.bucket)
    for key, data in objects.items():
        bucket.blob(key).upload_from_string(data)
    return objects


def test_migration_on_gcs_copies_server_side_and_downloads_nothing(gcs_emulator, tmp_path):
    recorder = Recorder()

    class Sink:
        @hookimpl
        def regmw_event_sink(self, config, services):
            return recorder

    runtime = regmw.build({
        "regmw": {"plugins": ["gcs", "migration"], "entry_points": False},
        "gcs": gcs_emulator.gcs_section(),
        "migration": {"old_root": OLD, "new_root": NEW},
        "migration_job": {"drain": 0},
        "jobs": {"queue_path": str(tmp_path / "jobs.sqlite3"), "run_in_process": False},
    }, environ={}, plugins=[Sink()])
    services = runtime.services
    services.serving = True  # the one serving process runs the jobs: its in-process locks and cache are the ones
    shared = b"shared layer " * 5000
    seeded = {name: put_repository(gcs_emulator, name, [shared, name.encode() * 3000]) for name in ("g/a", "g/b")}
    log = count_requests(services.storage.client)
    for name in seeded:
        services.jobs.enqueue(JOB_NAME, repository=name)
    stop = threading.Event()
    while services.jobs.run_one(stop):
        pass
    assert {r.state for r in services.jobs.status(JOB_NAME)} == {"done"}, services.jobs.status(JOB_NAME)
    bucket = gcs_emulator.client.bucket(gcs_emulator.bucket)
    for name, objects in seeded.items():
        for key, data in objects.items():
            assert bucket.blob(NEW + key[len(OLD):]).download_as_bytes() == data
        assert services.cache.get(services.classifier.cache_key(name)) == b"new"
    assert [(e["action"], e["target"]["repository"]) for e in recorder.events] == [
        (action, name) for name in ("g/a", "g/b") for action in ("locked", "migrated", "unlocked")]
    urls = [url for _, url, _ in log.entries]
    assert any("/rewriteTo/" in url for url in urls)
    downloads = [url for url in urls if "alt=media" in url or "/download/" in url]
    assert downloads == []
    uploads = [url for url in urls if "/upload/" in url]
    assert uploads == []


def test_purge_on_gcs_deletes_only_stale_sessions_from_listing_metadata(gcs_emulator, tmp_path):
    runtime = regmw.build({
        "regmw": {"plugins": ["gcs"], "entry_points": False}, "gcs": gcs_emulator.gcs_section(),
        "jobs": {"queue_path": str(tmp_path / "jobs.sqlite3"), "run_in_process": False},
    }, environ={})
    root = "docker/registry/v2"
    gcs_emulator.put(f"{root}/repositories/p/app/_uploads/u1/startedat", f"{root}/repositories/p/app/_uploads/u1/data",
                     f"{root}/repositories/p/app/_layers/sha256/ab/link", f"{root}/blobs/sha256/ab/ab/data")
    log = count_requests(runtime.services.storage.client)
    context = JobContext(runtime.services, "purge", "purge-uploads")
    assert purge(context, [root], max_age=3600) == 0  # fresh: kept
    assert purge(context, [root], max_age=3600, clock=lambda: time.time() + 7200) == 2
    names = sorted(b.name for b in gcs_emulator.client.list_blobs(gcs_emulator.bucket))
    assert names == [f"{root}/blobs/sha256/ab/ab/data", f"{root}/repositories/p/app/_layers/sha256/ab/link"]
    assert not [url for _, url, _ in log.entries if "alt=media" in url]
