"""Storage existence checks on a local filesystem registry layout.

The registry's filesystem driver keeps a repository under
``<root>/docker/registry/v2/repositories/<name>/``. ``prefix_exists(prefix)``
reads keys as plain prefixes, like GCS: it splits ``prefix`` at its last ``/``
into a directory and the start of an entry's name, and answers with ONE
``scandir`` of that directory that stops at the first entry whose name starts
so. ``a/b/`` asks "is anything in ``a/b``?"; the classifier's
``repositories/<name>/_`` asks "does ``<name>`` have its own ``_layers``,
``_manifests`` or ``_uploads``?" and looks at nothing else (child
repositories are other entries of the same directory). It is the filesystem
twin of the GCS plugin's one-item delimited list.

One difference stays, for the price of one ``scandir``: an empty directory
that starts with the prefix counts here (the registry's filesystem driver
leaves an empty ``_uploads/`` behind when an upload ends), where GCS, which has
no directories, would list nothing.
"""
from __future__ import annotations

import os

from regmw import metrics
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
        """True if an entry of ``prefix``'s directory has a name starting with the rest: one ``scandir``."""
        directory, _, start = prefix.rpartition("/")
        path = self._path(directory)
        with metrics.storage_request(self.driver, "prefix_exists"):
            try:
                with os.scandir(path) as entries:
                    return any(entry.name.startswith(start) for entry in entries)
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
