"""Distribution's filesystem-driver layout, read and written by the reference registry.

The reference registry stores exactly what ``registry:2``'s filesystem driver
stores, at the same paths, so that anything built for a real registry's
storage (regmw's filesystem storage stat, which asks whether
``docker/registry/v2/repositories/<name>/`` holds an own ``_`` entry) works unchanged on
it, and a storage root can be served by either::

    <root>/docker/registry/v2/
        blobs/sha256/<xx>/<hex>/data                         content, shared by all repositories
        repositories/<name>/
            _layers/sha256/<hex>/link                        "sha256:<hex>": the blob is in this repository
            _manifests/revisions/sha256/<hex>/link           a manifest of this repository
            _manifests/tags/<tag>/current/link               what the tag points at now
            _manifests/tags/<tag>/index/sha256/<hex>/link    every manifest the tag ever pointed at
            _uploads/<uuid>/data, startedat                  uploads in progress

Only sha256 digests are accepted: callers validate a digest with
:func:`parse_digest` before it reaches a path, and names with :data:`NAME_RE`.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from datetime import UTC, datetime
from typing import BinaryIO

from regmw.routes import MAX_NAME_LENGTH, NAME_RE  # one grammar for the registry and the middleware

SHA256_RE = re.compile(r"sha256:([a-f0-9]{64})")
UUID_RE = re.compile(r"[a-f0-9-]{36}")
CHUNK = 64 * 1024


def parse_digest(digest: str) -> str | None:
    """The hex part of a ``sha256:<64 hex>`` digest, or None if it is not one."""
    match = SHA256_RE.fullmatch(digest)
    return match.group(1) if match else None


def valid_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and NAME_RE.fullmatch(name) is not None


class Layout:
    """Paths and small atomic operations over one storage root."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.base = os.path.join(self.root, "docker", "registry", "v2")

    # --- paths ------------------------------------------------------------

    def blob_data(self, hex_: str) -> str:
        return os.path.join(self.base, "blobs", "sha256", hex_[:2], hex_, "data")

    def repo(self, name: str) -> str:
        return os.path.join(self.base, "repositories", *name.split("/"))

    def layer_link(self, name: str, hex_: str) -> str:
        return os.path.join(self.repo(name), "_layers", "sha256", hex_, "link")

    def revisions_dir(self, name: str) -> str:
        return os.path.join(self.repo(name), "_manifests", "revisions", "sha256")

    def revision_link(self, name: str, hex_: str) -> str:
        return os.path.join(self.revisions_dir(name), hex_, "link")

    def tags_dir(self, name: str) -> str:
        return os.path.join(self.repo(name), "_manifests", "tags")

    def tag_current(self, name: str, tag: str) -> str:
        return os.path.join(self.tags_dir(name), tag, "current", "link")

    def tag_index(self, name: str, tag: str, hex_: str) -> str:
        return os.path.join(self.tags_dir(name), tag, "index", "sha256", hex_, "link")

    def upload_dir(self, name: str, upload_id: str) -> str:
        return os.path.join(self.repo(name), "_uploads", upload_id)

    # --- links --------------------------------------------------------------

    @staticmethod
    def write_link(path: str, digest: str) -> None:
        """Write a link file atomically (a reader never sees half a digest)."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".link-")
        with os.fdopen(fd, "w") as handle:
            handle.write(digest)
        os.replace(tmp, path)

    @staticmethod
    def read_link(path: str) -> str | None:
        try:
            with open(path) as handle:
                digest = handle.read().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return digest if parse_digest(digest) else None

    # --- blobs --------------------------------------------------------------

    def linked_blob(self, name: str, digest: str) -> str | None:
        """The data file of ``digest`` if the repository links it, else None."""
        hex_ = parse_digest(digest)
        if hex_ is None or self.read_link(self.layer_link(name, hex_)) != digest:
            return None
        path = self.blob_data(hex_)
        return path if os.path.isfile(path) else None

    def link_blob(self, name: str, digest: str) -> None:
        self.write_link(self.layer_link(name, parse_digest(digest)), digest)

    def commit(self, name: str, data_path: str, digest: str) -> None:
        """Move verified upload data into the blob store and link it into ``name``."""
        hex_ = parse_digest(digest)
        target = self.blob_data(hex_)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.exists(target):
            os.unlink(data_path)  # content-addressed: the bytes are already there
        else:
            os.replace(data_path, target)
        self.link_blob(name, digest)

    def put_content(self, data: bytes) -> str:
        """Store small content (a manifest) as a blob; returns its digest."""
        hex_ = hashlib.sha256(data).hexdigest()
        target = self.blob_data(hex_)
        if not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".data-")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        return "sha256:" + hex_

    # --- uploads ------------------------------------------------------------

    def start_upload(self, name: str) -> str:
        upload_id = str(uuid.uuid4())
        folder = self.upload_dir(name, upload_id)
        os.makedirs(folder)
        open(os.path.join(folder, "data"), "wb").close()
        with open(os.path.join(folder, "startedat"), "w") as handle:
            handle.write(datetime.now(UTC).isoformat())
        return upload_id

    def upload_data(self, name: str, upload_id: str) -> str | None:
        """The data file of an upload in progress, or None if there is no such upload."""
        if not UUID_RE.fullmatch(upload_id):
            return None
        path = os.path.join(self.upload_dir(name, upload_id), "data")
        return path if os.path.isfile(path) else None

    def end_upload(self, name: str, upload_id: str) -> None:
        shutil.rmtree(self.upload_dir(name, upload_id), ignore_errors=True)


def append_stream(path: str, stream: BinaryIO, limit: int | None = None) -> int:
    """Append ``stream`` (at most ``limit`` bytes) to ``path`` chunk by chunk; returns bytes written."""
    written = 0
    with open(path, "ab") as out:
        while limit is None or written < limit:
            want = CHUNK if limit is None else min(CHUNK, limit - written)
            chunk = stream.read(want)
            if not chunk:
                break
            out.write(chunk)
            written += len(chunk)
    return written


def file_digest(path: str) -> str:
    with open(path, "rb") as handle:
        return "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()

