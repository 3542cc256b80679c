"""The ``[migration]`` configuration section."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from regmw.config import Option, Section


def _prefix(value: str) -> str:
    """A storage prefix relative to the storage root: no leading/trailing slash, no empty or dot segments."""
    prefix = value.strip("/")
    if not prefix or any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ValueError("must be a storage prefix like 'docker/registry/v2'")
    return prefix


def roots_differ(section: Mapping[str, Any], config: Any = None) -> str | None:
    """`new_root` differs from `old_root` (a repository cannot be migrated onto itself)."""
    if section["enabled"] and section["old_root"] == section["new_root"]:
        return "migration.new_root must differ from migration.old_root"
    return None


SECTION = Section(
    "migration",
    "Old/new classification of every repository during a storage migration (the `migration` plugin).",
    {
        "enabled": Option("bool", True, "Classify requests. false: no classification, every request goes to the main app."),
        "old_root": Option(
            "str",
            "docker/registry/v2",
            "Prefix of the OLD storage layout, relative to the storage root; a repository exists there if "
            "it has its own entries there (`<old_root>/repositories/<name>/_*`: `_layers`, `_manifests`, "
            "`_uploads`), never merely a child repository's.",
            check=_prefix,
        ),
        "new_root": Option(
            "str",
            None,
            "Prefix of the NEW storage layout, relative to the storage root (must differ from `old_root`).",
            required=True,
            check=_prefix,
        ),
        "paused": Option(
            "bool",
            False,
            "Pause the migration: no repository becomes new; repositories already new stay new.",
        ),
        "old_ttl": Option(
            "float",
            300.0,
            "Seconds a cached \"old\" answer lives (a repository can be migrated; `regmw migrate-mark` "
            "invalidates it at once).",
            minimum=1,
        ),
        "new_ttl": Option(
            "float", 0.0, "Seconds a cached \"new\" answer lives; 0 = permanent (a new repository never becomes old).",
            minimum=0,
        ),
        "response_header": Option("bool", True, "Add `Regmw-Migration-Path: old|new` to every classified response."),
        "retry_after": Option(
            "int", 5, "Retry-After seconds of the 503 UNAVAILABLE sent when storage cannot answer.", minimum=1
        ),
        "wait_timeout": Option(
            "float",
            30.0,
            "Seconds a request waits for a look-up of the same repository already in flight in this process; "
            "keep it above the storage timeout plus its retries.",
            minimum=0.001,
        ),
        "max_inflight": Option(
            "int",
            4096,
            "Most repositories looked up at once with coalescing in one process; beyond it look-ups run uncoalesced "
            "(memory stays bounded).",
            minimum=1,
        ),
    },
    checks=(roots_differ,),
)
