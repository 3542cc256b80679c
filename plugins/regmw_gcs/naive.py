"""The naive Stat the Go registry used: the baseline of ``benchmarks/stat_bench.py`` only.

An object GET with full metadata, then, when there is no such object, an
UNdelimited, full-metadata list of everything under ``path/`` (the first page,
as Go's ``it.Next()`` read it). Its cost grows with the repository's size;
never use it for classification.
"""
from __future__ import annotations

from regmw.errors import StorageError

from .storage import GCS_ERRORS, GCSStorage, StatResult, _describe


def naive_stat(storage: GCSStorage, path: str) -> StatResult | None:
    key = storage.key(path)
    blob = storage.get_object(key, projection="full")
    if blob is not None:
        modified = blob.updated.timestamp() if blob.updated else None
        return StatResult(path, False, int(blob.size or 0), modified)
    try:
        iterator = storage.client.list_blobs(
            storage.bucket_name, prefix=key.rstrip("/") + "/", projection="full",
            timeout=storage.timeout, retry=storage.retry,
        )
        page = next(iterator.pages, None)
    except GCS_ERRORS as exc:
        raise StorageError(f"gcs: naive stat of {key} failed: {_describe(exc)}") from exc
    if page is not None and page.num_items > 0:
        return StatResult(path, True)
    return None
