"""The ``[gcs]`` configuration section: where the registry's objects live and how hard to try.

Timeouts and retries are explicit because a classification waits on them: the
request that triggered the look-up is held until storage answers or gives up,
and giving up must be bounded (it becomes a 503 with Retry-After).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from regmw.config import Option, Section


def _check_root(value: str) -> str:
    """The root is an object-name prefix: no leading/trailing slash, no empty or dot segments."""
    root = value.strip("/")
    if root and any(part in ("", ".", "..") for part in root.split("/")):
        raise ValueError("must be a plain object-name prefix like 'registry' (no empty, '.' or '..' segments)")
    return root


def one_credential(section: Mapping[str, Any], config: Any = None) -> str | None:
    """`anonymous` or `credentials_file`, not both; a `credentials_file` that can be read."""
    path = section.get("credentials_file")
    if not path:
        return None
    if section["anonymous"]:
        return "gcs.anonymous and gcs.credentials_file are both set (choose one kind of credentials)"
    if not os.access(path, os.R_OK):
        return f"gcs.credentials_file: cannot read {path}"
    return None


SECTION = Section(
    "gcs",
    "Google Cloud Storage for existence checks (the `gcs` plugin). Point it at the registry's bucket.",
    {
        "bucket": Option("str", None, "Bucket holding the registry's objects.", required=True),
        "root": Option(
            "str",
            "",
            "Object-name prefix of the registry's storage inside the bucket (the GCS driver's "
            "`rootdirectory`, without slashes). Prefixes checked by other plugins, e.g. "
            "`docker/registry/v2/repositories/<name>/`, are relative to it.",
            check=_check_root,
        ),
        "project": Option("str", None, "Google Cloud project of the client (needed only with anonymous credentials)."),
        "endpoint": Option(
            "url",
            None,
            "API endpoint, e.g. `http://127.0.0.1:9023` for an emulator. Empty: the real GCS.",
            schemes=("http", "https"),
        ),
        "anonymous": Option("bool", False, "Use anonymous credentials (emulators). Otherwise Application Default Credentials."),
        "credentials_file": Option("path", None, "Service-account JSON key file (instead of Application Default Credentials)."),
        "timeout": Option("float", 5.0, "Seconds one HTTP request to GCS may take (connect and read).", minimum=0.001),
        "retry_deadline": Option(
            "float",
            10.0,
            "Total seconds spent retrying a transient GCS error (429, 5xx, connection reset) before it "
            "becomes a storage error; 0 disables retries.",
            minimum=0,
        ),
        "retry_initial": Option("float", 0.1, "First retry delay in seconds.", minimum=0.001),
        "retry_maximum": Option("float", 2.0, "Longest retry delay in seconds.", minimum=0.001),
        "retry_multiplier": Option("float", 2.0, "Factor by which the retry delay grows.", minimum=1.0),
    },
    checks=(one_credential,),
)
