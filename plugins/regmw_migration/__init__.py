"""regmw built-in plugin ``migration``: classify every repository as old or new during a storage migration.

Enable with ``[regmw] plugins = ["migration"]`` (plus a storage: the ``gcs``
plugin, or the embedded filesystem storage) and a ``[migration]`` section
naming the new prefix. Each API request for a repository gets
``context.migration_path`` = ``"old"`` or ``"new"``, a
``Regmw-Migration-Path`` response header, and is dispatched to
``apps["old"]`` / ``apps["new"]`` when the middleware has them. The decision is
in :mod:`.decision`, the cache and storage look-ups in :mod:`.classifier`;
docs/classification.md explains both.

When a repository has been migrated, say so with :func:`mark_migrated`
(``regmw migrate-mark REPO``), or, from inside a request the app served,
by setting ``environ["regmw.migrated"] = True``: the plugin marks the request's
repository once the response succeeded.
"""
from __future__ import annotations

import logging

from regmw.backends import Services
from regmw.errors import ConfigError
from regmw.plugins import hookimpl

from .classifier import HEADER, Classifier
from .settings import SECTION

__all__ = ["Classifier", "HEADER", "SECTION", "mark_migrated", "classifier_of"]

log = logging.getLogger("regmw.migration")

EXTRA = "migration"
MIGRATED_ENVIRON_KEY = "regmw.migrated"


def classifier_of(services: Services) -> Classifier | None:
    """The runtime's classifier, or None when the plugin is loaded but disabled."""
    return services.extras.get(EXTRA)


def mark_migrated(services: Services, repository: str) -> None:
    """Record that ``repository`` has been migrated: its classification becomes "new" at once.

    Writes "new" (permanent by default) over any cached "old". Raises
    :class:`~regmw.errors.ConfigError` when the migration plugin is not
    enabled and :class:`~regmw.errors.BackendUnavailable` when the cache did
    not keep the mark. With the embedded in-process cache the mark is seen by
    this process only; use a shared cache (redis) for a fleet.
    """
    classifier = classifier_of(services)
    if classifier is None:
        raise ConfigError("migration: the plugin is not enabled ([regmw] plugins = [\"migration\"], [migration] enabled)")
    if type(services.cache).__module__ == "regmw.defaults.memory_cache":
        log.warning("marking %s in an in-process cache: other processes will not see it", repository)
    classifier.mark_migrated(repository)


@hookimpl
def regmw_config_sections():
    return [SECTION]


@hookimpl
def regmw_startup(services: Services) -> None:
    section = services.config["migration"]
    if not section["enabled"]:
        return
    if section["old_root"] == section["new_root"]:
        raise ConfigError(f"{services.config.source}: migration.new_root must differ from migration.old_root")
    if services.storage is None:
        raise ConfigError(f"{services.config.source}: migration needs a storage backend (the gcs plugin or [storage])")
    classifier = Classifier(services, section)
    services.extras[EXTRA] = classifier
    services.prefetch.append(classifier.prefetch_key)


@hookimpl
def regmw_classify(context):
    classifier = classifier_of(context.services)
    return classifier.classify(context) if classifier is not None else None


@hookimpl
def regmw_finish(context, status):
    """Hook-driven invalidation: the app set ``environ["regmw.migrated"]`` on a request it served well."""
    if not context.environ.get(MIGRATED_ENVIRON_KEY) or not status or status >= 400 or not context.repository:
        return
    classifier = classifier_of(context.services)
    if classifier is not None:
        classifier.mark_migrated(context.repository)


@hookimpl
def regmw_cli_commands():
    from .cli import migrate_mark

    return [migrate_mark]
