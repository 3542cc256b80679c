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

It is also an :class:`~regmw.backends.ObjectStorage` for the migration and
purge jobs: ``list`` walks a prefix, ``copy`` writes a temporary file next to
the destination and renames it over (a reader, or a crash, never sees half an
object), ``digest`` hashes a file locally (no network is involved).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from regmw import metrics
from regmw.backends import StoredObject
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

    def _key(self, path: str) -> str:
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Every file under ``prefix`` (a directory prefix), recursively; temporary copies are skipped."""
        top = self._path(prefix)
        try:
            for folder, _, files in os.walk(top, onerror=_raise):
                for name in files:
                    if name.startswith(".regmw-copy-"):
                        continue
                    path = os.path.join(folder, name)
                    try:
                        info = os.stat(path)
                    except FileNotFoundError:
                        continue  # removed while we walked (an upload finished)
                    yield StoredObject(self._key(path), info.st_size, None, info.st_mtime)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot list {top}: {exc}") from exc

    def head(self, key: str) -> StoredObject | None:
        path = self._path(key)
        try:
            info = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StorageError(f"cannot stat {path}: {exc}") from exc
        return StoredObject(self._key(path), info.st_size, None, info.st_mtime)

    def copy(self, src: str, dst: str) -> None:
        """Copy one file; the destination appears whole (temporary file + rename) or not at all."""
        source, target = self._path(src), self._path(dst)
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".regmw-copy-")
            try:
                with os.fdopen(fd, "wb") as out, open(source, "rb") as handle:
                    shutil.copyfileobj(handle, out, 1024 * 1024)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise StorageError(f"cannot copy {src} to {dst}: {exc}") from exc

    def delete(self, key: str) -> None:
        """Remove one file (absent is fine) and the directories it leaves empty, up to the root."""
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot delete {path}: {exc}") from exc
        folder = os.path.dirname(path)
        while folder != self.root and folder.startswith(self.root + os.sep):
            try:
                os.rmdir(folder)
            except OSError:
                break  # not empty (or gone): stop climbing
            folder = os.path.dirname(folder)

    def digest(self, key: str) -> str | None:
        """``sha256:<hex>`` of a file's content, read locally."""
        path = self._path(key)
        try:
            with open(path, "rb") as handle:
                return "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc}") from exc


def _raise(error: OSError) -> None:
    raise error


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
