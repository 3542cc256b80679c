"""Storage existence checks on a local filesystem registry layout.

The registry's filesystem driver keeps a repository under
``<root>/docker/registry/v2/repositories/<name>/``; ``prefix_exists`` answers
with one ``scandir`` that stops at the first entry, the filesystem twin of the
GCS plugin's one-item delimited list.
"""
from __future__ import annotations

import os

from regmw.config import Option, Section
from regmw.errors import StorageError
from regmw.plugins import hookimpl


class FilesystemStorage:
    driver = "filesystem"

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def _path(self, key: str) -> str:
        path = os.path.normpath(os.path.join(self.root, key.lstrip("/")))
        if path != self.root and not path.startswith(self.root + os.sep):
            raise StorageError(f"path escapes the storage root: {key!r}")
        return path

    def prefix_exists(self, prefix: str) -> bool:
        """True if anything (a file or a sub-directory) exists under ``prefix``."""
        path = self._path(prefix)
        try:
            with os.scandir(path) as entries:
                return next(entries, None) is not None
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise StorageError(f"cannot list {path}: {exc}") from exc


SECTION = Section(
    "storage",
    "The embedded filesystem storage used for existence checks when no storage plugin (gcs) is enabled.",
    {
        "root": Option(
            "path",
            "/var/lib/registry",
            "Root directory of the registry's filesystem storage (the driver's `rootdirectory`).",
        ),
    },
)


@hookimpl
def regmw_config_sections():
    return [SECTION]


@hookimpl
def regmw_storage(config):
    return FilesystemStorage(config["storage"]["root"])
