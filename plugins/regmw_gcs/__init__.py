"""regmw built-in plugin ``gcs``: storage existence checks on Google Cloud Storage.

Enable with ``[regmw] plugins = ["gcs"]`` and a ``[gcs]`` section naming the
bucket. It provides the :class:`regmw.backends.Storage` that the classification
plugin (``migration``) asks "does this repository exist under prefix P?":
one ``objects.list`` request of about a hundred bytes, whatever the size of
the repository.
"""
from __future__ import annotations

from regmw.plugins import hookimpl

from .naive import naive_stat
from .settings import SECTION
from .storage import GCSStorage

__all__ = ["GCSStorage", "naive_stat", "SECTION"]


@hookimpl
def regmw_config_sections():
    return [SECTION]


@hookimpl
def regmw_storage(config):
    return GCSStorage.from_config(config["gcs"])
