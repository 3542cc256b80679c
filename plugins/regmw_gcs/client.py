"""Build the google-cloud-storage client and the retry policy from ``[gcs]``."""
from __future__ import annotations

from typing import Any, Mapping

from google.api_core.retry import Retry
from google.cloud import storage
from google.auth.exceptions import DefaultCredentialsError
from google.cloud.storage.retry import DEFAULT_RETRY

from regmw.errors import ConfigError


def make_client(section: Mapping[str, Any]) -> storage.Client:
    """A client for the configured endpoint and credentials; it makes no request by itself.

    Missing or unreadable credentials stop start-up with one line naming the
    options, not a traceback at the first request.
    """
    try:
        return quiet(_client(section))
    except (DefaultCredentialsError, OSError, ValueError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"gcs: cannot build a GCS client ({first_line}); set gcs.credentials_file, "
            "Application Default Credentials, or gcs.anonymous = true for an emulator"
        ) from None


def quiet(client: storage.Client) -> storage.Client:
    """Switch off the client's background bucket-metadata fetches.

    google-cloud-storage 3.x keeps a telemetry cache of bucket metadata: the
    first call on a bucket queues a background ``buckets.get``, and every 404
    (a stat of an absent object) queues a background ``bucket.exists()``. Those
    are requests our one-request checks would pay for, invisibly; the library
    skips all of it when the cache is unset.
    """
    if getattr(client, "_bucket_metadata_cache", None) is not None:
        client._bucket_metadata_cache = None
    return client


def _client(section: Mapping[str, Any]) -> storage.Client:
    options = {"api_endpoint": section["endpoint"]} if section.get("endpoint") else None
    if section.get("anonymous"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(
            project=section.get("project") or "regmw", credentials=AnonymousCredentials(), client_options=options
        )
    if section.get("credentials_file"):
        return storage.Client.from_service_account_json(
            section["credentials_file"], project=section.get("project"), client_options=options
        )
    return storage.Client(project=section.get("project"), client_options=options)


def make_retry(section: Mapping[str, Any]) -> Retry | None:
    """GCS's own transient-error predicate with our delays and total deadline; None = no retries."""
    if not section["retry_deadline"]:
        return None
    return DEFAULT_RETRY.with_delay(
        initial=section["retry_initial"], maximum=section["retry_maximum"], multiplier=section["retry_multiplier"]
    ).with_timeout(section["retry_deadline"])
