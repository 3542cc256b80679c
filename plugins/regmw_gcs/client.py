"""Build the google-cloud-storage client and the retry policy from ``[gcs]``."""
from __future__ import annotations

import os
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


#: google-cloud-storage's own switch for its background bucket-metadata fetches
#: (``DISABLE_BUCKET_MD_ENV_VAR``; the route its maintainers point to in
#: googleapis/google-cloud-python#18203)
NO_BACKGROUND_FETCHES = "DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA"


def quiet(client: storage.Client) -> storage.Client:
    """Switch off the client's background bucket-metadata fetches, through the library's own switch.

    google-cloud-storage 3.x keeps a telemetry cache of bucket metadata: the
    first call on a bucket queues a background ``buckets.get`` in a thread.
    Those are requests our one-request checks would pay for, invisibly. The
    library reads ``DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA`` at every
    call; it is process-wide (there is no per-client switch yet), so it is set
    only when the environment does not already say otherwise. With the cache
    never filled, its other background request (a ``bucket.exists()`` after a
    404) has nothing to check and is not sent either.
    ``tests/test_gcs_storage.py::test_client_makes_no_background_requests``
    checks that this holds for the installed version, and that the switch is
    what makes the difference.
    """
    os.environ.setdefault(NO_BACKGROUND_FETCHES, "true")
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
