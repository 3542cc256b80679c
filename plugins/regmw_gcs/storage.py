"""Existence checks on GCS that cost one small request whatever the repository's size.

``prefix_exists(prefix)`` is ONE ``objects.list`` call: ``prefix=<root>/<prefix>``
(a plain prefix, as GCS reads it), ``delimiter=/`` (objects deeper than one
level collapse into a handful of ``prefixes``), ``maxResults=1`` and a partial
response of ``items(name),prefixes,nextPageToken``. Anything on the page, an
object or a sub-prefix, means something's name starts with the prefix. A
caller asking about a directory ends the prefix with ``/``; the classifier
asks ``<root>/repositories/<name>/_``: the repository's OWN entries
(``_layers/``, ``_manifests/``, ``_uploads/``), never its child repositories
(docs/classification.md says why).

The iterator google-cloud-storage returns would fetch a SECOND page when the
first one holds only a prefix and a ``nextPageToken`` (it keeps paging until it
has ``max_results`` *items*, and prefixes are not items). We therefore read
pages from ``iterator.pages`` ourselves and stop at the first that holds
anything: normally the first, so one request.

GCS may answer with fewer than ``maxResults`` entries, even none, and still a
``nextPageToken``: an empty page WITH a token says nothing about absence. Such
a page is followed for at most :data:`MAX_EMPTY_PAGES` more pages; still empty
with a token after that, the check raises :class:`StorageError` rather than
guess "absent". Only an empty page without a token means absent.

Every page is read strictly (:mod:`.listing`): an answer in a shape the API
does not promise is a :class:`StorageError`, not "exists". So is every other
failure (timeout, 5xx after retries, auth, a missing bucket, a body that is not
JSON): an error is never reported as "absent" nor as "present".
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any, Mapping

from google.api_core.exceptions import GoogleAPIError, NotFound
from google.auth.exceptions import GoogleAuthError
from requests.exceptions import RequestException

from regmw import metrics
from regmw.backends import StoredObject
from regmw.errors import StorageError

from .client import make_client, make_retry
from .listing import MalformedAnswer, read_page

log = logging.getLogger("regmw.gcs")

#: what a failed GCS call can raise; all of it becomes StorageError
GCS_ERRORS = (GoogleAPIError, GoogleAuthError, RequestException, OSError, ValueError)

PREFIX_FIELDS = "items(name),prefixes,nextPageToken"

#: what google-cloud-storage raises while unpacking a page in a shape the API does not
#: promise (a top-level list, ``items`` that is a number, unhashable prefixes), before
#: :func:`.listing.read_page` sees it
MALFORMED_PAGE_ERRORS = (TypeError, AttributeError, KeyError)

#: a full listing for the migration: names, sizes and checksums, never content
LIST_FIELDS = "items(name,size,crc32c,updated),nextPageToken"

#: extra pages followed when a page is empty but carries a nextPageToken
MAX_EMPTY_PAGES = 3


@dataclass(frozen=True)
class StatResult:
    """What :meth:`GCSStorage.stat` found (this plugin's own API: benchmarks/stat_bench.py compares it
    with the naive Stat; regmw's Storage contract is ``prefix_exists`` alone)."""

    path: str
    is_dir: bool
    size: int = 0
    modified: float | None = None


class GCSStorage:
    """:class:`regmw.backends.ObjectStorage` on a GCS bucket, keys relative to ``root``."""

    driver = "gcs"

    def __init__(self, client: Any, bucket: str, root: str = "", timeout: float = 5.0, retry: Any = None) -> None:
        self.client = client
        self.bucket_name = bucket
        self.bucket = client.bucket(bucket)  # no request: a local handle
        self.root = root.strip("/")
        self.timeout = timeout
        self.retry = retry

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> "GCSStorage":
        return cls(make_client(section), section["bucket"], section["root"], section["timeout"], make_retry(section))

    def key(self, path: str) -> str:
        """The object name for ``path`` (relative to the root), without leading slashes."""
        path = path.lstrip("/")
        return f"{self.root}/{path}" if self.root else path

    def prefix_exists(self, prefix: str) -> bool:
        """True if some object's name starts with ``<root>/<prefix>`` (a plain prefix, as GCS reads it).

        End ``prefix`` with ``/`` to ask about a directory (``group/foo/`` never
        matches ``group/foobar/...``). One HTTP request, unless GCS answers with
        an empty page and a continuation token (then at most
        :data:`MAX_EMPTY_PAGES` more).
        """
        with metrics.storage_request(self.driver, "prefix_exists"):
            return self._list_one(self.key(prefix))

    def ready(self) -> None:
        """For ``/-/regmw/ready``: one names-only listing under the root (raises StorageError)."""
        self._list_one(self.key("repositories/"))

    def stat(self, path: str) -> StatResult | None:
        """The compound Stat: object metadata GET, then (if no such object) one names-only list.

        Returns a file result, a directory result (something lies under
        ``path/``), or None. At most two HTTP requests, both small.
        """
        metrics.storage_requests.labels(self.driver).inc()
        key = self.key(path)
        blob = self.get_object(key, "noAcl")
        if blob is not None:
            modified = blob.updated.timestamp() if blob.updated else None
            return StatResult(path, False, int(blob.size or 0), modified)
        if self._list_one(key.rstrip("/") + "/"):
            return StatResult(path, True)
        return None

    def get_object(self, key: str, projection: str = "noAcl") -> Any:
        """The object's metadata (one GET), or None when there is no such object."""
        blob = self.bucket.blob(key)
        try:
            blob.reload(projection=projection, timeout=self.timeout, retry=self.retry)
        except NotFound:
            return None
        except GCS_ERRORS as exc:
            raise StorageError(f"gcs: cannot stat gs://{self.bucket_name}/{key}: {_describe(exc)}") from exc
        return blob

    def _list_one(self, prefix: str) -> bool:
        try:
            iterator = self.client.list_blobs(
                self.bucket_name,
                prefix=prefix,
                delimiter="/",
                max_results=1,
                fields=PREFIX_FIELDS,
                timeout=self.timeout,
                retry=self.retry,
            )
            pages = iterator.pages
            for number in range(1 + MAX_EMPTY_PAGES):
                if number:
                    metrics.storage_requests.labels(self.driver).inc()
                try:
                    page = next(pages, None)  # one page at a time: never let the iterator run on by itself
                except MALFORMED_PAGE_ERRORS as exc:
                    raise MalformedAnswer(f"the client could not unpack the answer ({_describe(exc)})") from exc
                if page is None:
                    return False
                answer = read_page(page.raw_page, prefix)
                if answer.found:
                    return True
                if answer.next_page_token is None:
                    return False  # empty and nothing more: absent
                log.debug("gs://%s/%s: empty page with a nextPageToken, following it", self.bucket_name, prefix)
        except MalformedAnswer as exc:
            raise StorageError(f"gcs: malformed answer listing gs://{self.bucket_name}/{prefix}: {exc}") from exc
        except GCS_ERRORS as exc:
            raise StorageError(f"gcs: cannot list gs://{self.bucket_name}/{prefix}: {_describe(exc)}") from exc
        raise StorageError(
            f"gcs: cannot list gs://{self.bucket_name}/{prefix}: {1 + MAX_EMPTY_PAGES} empty pages, "
            "each with a nextPageToken (existence unknown)"
        )


    # --- ObjectStorage: list / head / copy / delete (the migration and purge jobs) -------------

    def _relative(self, name: str) -> str:
        return name[len(self.root) + 1:] if self.root else name

    def _stored(self, blob: Any) -> StoredObject:
        modified = blob.updated.timestamp() if blob.updated else 0.0
        return StoredObject(self._relative(blob.name), int(blob.size or 0), blob.crc32c, modified)

    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Every object under ``prefix/`` (undelimited, metadata fields only: no content is read)."""
        name = self.key(prefix)
        try:
            for blob in self.client.list_blobs(self.bucket_name, prefix=name, fields=LIST_FIELDS,
                                               timeout=self.timeout, retry=self.retry):
                yield self._stored(blob)
        except GCS_ERRORS as exc:
            raise StorageError(f"gcs: cannot list gs://{self.bucket_name}/{name}: {_describe(exc)}") from exc

    def head(self, key: str) -> StoredObject | None:
        blob = self.get_object(self.key(key))
        return None if blob is None else self._stored(blob)

    def copy(self, src: str, dst: str) -> None:
        """Server-side copy with ``objects.rewrite`` (no byte passes through regmw), following rewrite tokens.

        GCS makes the destination appear whole when the last rewrite call completes.
        """
        source = self.bucket.blob(self.key(src))
        target = self.bucket.blob(self.key(dst))
        token = None
        try:
            while True:
                token, _, _ = target.rewrite(source, token=token, timeout=self.timeout, retry=self.retry)
                if token is None:
                    return
        except GCS_ERRORS as exc:
            raise StorageError(f"gcs: cannot copy {source.name} to {target.name}: {_describe(exc)}") from exc

    def delete(self, key: str) -> None:
        try:
            self.bucket.blob(self.key(key)).delete(timeout=self.timeout, retry=self.retry)
        except NotFound:
            return
        except GCS_ERRORS as exc:
            raise StorageError(f"gcs: cannot delete gs://{self.bucket_name}/{self.key(key)}: {_describe(exc)}") from exc

    def digest(self, key: str) -> str | None:
        """None: GCS keeps crc32c/md5, not sha256; computing it would download the object (never done)."""
        return None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]
