"""The naive Stat the Go registry used: the baseline of ``benchmarks/stat_bench.py`` only.

An object GET with full metadata, then, when there is no such object, an
UNdelimited, full-metadata list of everything under ``path/`` (the first page,
as Go's ``it.Next()`` read it: up to 1,000 objects on GCS). Its cost grows with
the repository's size; never use it for classification.
"""
from __future__ import annotations

from regmw.errors import StorageError

from .storage import GCS_ERRORS, GCSStorage, _describe


def naive_stat(storage: GCSStorage, path: str) -> bool:
    """True if ``path`` is an object or something lies under ``path/``: two requests, the second unbounded."""
    key = storage.key(path)
    if storage.get_object(key, projection="full") is not None:
        return True
    try:
        iterator = storage.client.list_blobs(
            storage.bucket_name, prefix=key.rstrip("/") + "/", projection="full",
            timeout=storage.timeout, retry=storage.retry,
        )
        page = next(iterator.pages, None)
    except GCS_ERRORS as exc:
        raise StorageError(f"gcs: naive stat of {key} failed: {_describe(exc)}") from exc
    return page is not None and page.num_items > 0
