"""The GCS emulator (PyPI ``gcp-storage-emulator``) in-process on a free port, owned by the test.

It stands in for real GCS: the official google-cloud-storage client talks HTTP
to it. Requests are counted where the client sends them (its ``_http.request``),
so a test asserts the number of real HTTP requests, and their response bytes.

Known gaps of the emulator (documented in docs/classification.md): it honours
``prefix`` and ``delimiter`` but ignores ``maxResults``, ``fields`` and page
tokens, and it serves one request at a time.
"""
from __future__ import annotations

import copy
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from ._util import free_port, unavailable, wait_for_port

BUCKET = "regmw-test"


@dataclass
class RequestLog:
    """Requests a client made: (method, url, response bytes)."""

    entries: list[tuple[str, str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def count(self) -> int:
        return len(self.entries)

    @property
    def bytes(self) -> int:
        return sum(size for _, _, size in self.entries)

    def reset(self) -> None:
        with self.lock:
            self.entries.clear()


def count_requests(client: Any) -> RequestLog:
    """Wrap ``client._http.request`` so every HTTP request it sends is logged."""
    http = client._http
    original = http.request
    log = RequestLog()

    def request(method, url, *args, **kwargs):
        try:
            response = original(method, url, *args, **kwargs)
        except Exception:
            with log.lock:
                log.entries.append((method, url, 0))
            raise
        with log.lock:
            log.entries.append((method, url, len(response.content)))
        return response

    http.request = request
    return log


class Emulator:
    """A running emulator: ``endpoint``, ``bucket``, a seeding ``client``; ``stop()`` is idempotent."""

    def __init__(self, server: Any, port: int, bucket: str) -> None:
        self.server = server
        self.port = port
        self.bucket = bucket
        self.endpoint = f"http://127.0.0.1:{port}"
        self.client = self.make_client()
        self._stopped = False

    def make_client(self, quiet: bool = True):
        """A client of this emulator; ``quiet``: without google-cloud-storage's background requests."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        from regmw_gcs.client import quiet as quieten

        client = storage.Client(
            project="regmw-test", credentials=AnonymousCredentials(), client_options={"api_endpoint": self.endpoint}
        )
        return quieten(client) if quiet else client

    def gcs_section(self, **extra: Any) -> dict[str, Any]:
        """A ``[gcs]`` config section for this emulator (no retries: tests want the first answer)."""
        return {"bucket": self.bucket, "endpoint": self.endpoint, "anonymous": True, "project": "regmw-test",
                "timeout": 5.0, "retry_deadline": 0, **extra}

    def put(self, *names: str, data: bytes = b"x") -> None:
        bucket = self.client.bucket(self.bucket)
        for name in names:
            bucket.blob(name).upload_from_string(data)

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.server.stop()


def start_emulator(bucket: str = BUCKET) -> Emulator:
    try:
        from gcp_storage_emulator.server import create_server
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        unavailable(f"gcp-storage-emulator not installed: {exc}")
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    try:
        wait_for_port(port)
    except Exception as exc:
        server.stop()
        unavailable(f"GCS emulator did not start: {exc}")
    return Emulator(server, port, bucket)


@pytest.fixture(scope="session")
def _shared_gcs_emulator():
    emulator = start_emulator()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def gcs_emulator(_shared_gcs_emulator):
    """The session's in-memory GCS emulator, with a new empty bucket that only this test uses.

    Shared because stopping one takes half a second (its server polls for
    shutdown); tests that stop the emulator use ``own_gcs_emulator``. A bucket
    per test rather than wiping one: once, in CI, objects seeded right after a
    wipe were missing from the next listing. The emulator's storage has no
    lock, and a wipe from the test's thread races whatever its server thread
    is still doing; with a bucket each, nothing one test did reaches another.
    """
    shared = _shared_gcs_emulator
    view = copy.copy(shared)
    view.bucket = f"{shared.bucket}-{next(_bucket_numbers)}"
    view.client.create_bucket(view.bucket)
    return view


_bucket_numbers = itertools.count(1)


@pytest.fixture
def own_gcs_emulator():
    """A fresh emulator this test may stop; stopped at teardown."""
    emulator = start_emulator()
    try:
        yield emulator
    finally:
        emulator.stop()
