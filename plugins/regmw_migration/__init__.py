"""regmw built-in plugin ``migration``: classify every repository as old or new during a storage migration.

Enable with ``[regmw] plugins = ["migration"]`` (plus a storage: the ``gcs``
plugin, or the embedded filesystem storage) and a ``[migration]`` section
naming the new prefix. Each API request for a repository gets
``context.migration_path`` = ``"old"`` or ``"new"``, a
``Regmw-Migration-Path`` response header, and is dispatched to
``apps["old"]`` / ``apps["new"]`` when the middleware has them. The decision is
in :mod:`.decision`, the cache and storage look-ups in :mod:`.classifier`;
docs/classification.md explains both.

The classifier is this runtime's ``services.classifier`` (hook
``regmw_classifier``), and its cache key is declared through ``regmw_prefetch``,
so an admission that reads the cache anyway (the Redis one) reads it in the
same round trip. When a repository has been migrated, say so with
:func:`mark_migrated` (``regmw migrate-mark REPO``), or, from inside a request
the app served, by setting ``environ["regmw.migrated"] = True``: the plugin
marks the request's repository once the response succeeded.
"""
from __future__ import annotations

import logging

from regmw.backends import Services
from regmw.errors import ConfigError
from regmw.plugins import hookimpl

from .classifier import HEADER, Classifier
from .settings import SECTION

__all__ = ["Classifier", "HEADER", "SECTION", "mark_migrated"]

log = logging.getLogger("regmw.migration")

MIGRATED_ENVIRON_KEY = "regmw.migrated"


def mark_migrated(services: Services, repository: str) -> None:
    """Record that ``repository`` has been migrated: its classification becomes "new" at once.

    Writes "new" (permanent by default) over any cached "old". Raises
    :class:`~regmw.errors.ConfigError` when no classifier is configured and
    :class:`~regmw.errors.BackendUnavailable` when the cache did not keep the
    mark. With a cache that is not ``shared`` (the embedded in-process one)
    the mark is seen by this process only; use a shared cache (redis) for a fleet.
    """
    classifier = services.classifier
    if classifier is None:
        raise ConfigError("migration: the plugin is not enabled ([regmw] plugins = [\"migration\"], [migration] enabled)")
    if not getattr(services.cache, "shared", False):
        log.warning("marking %s in an in-process cache: other processes will not see it", repository)
    classifier.mark_migrated(repository)


@hookimpl
def regmw_config_sections():
    from .jobsettings import SECTION as JOB_SECTION

    return [SECTION, JOB_SECTION]


@hookimpl
def regmw_jobs(config):
    """The repository migration job (``migrate-repository``, see :mod:`.migrate`)."""
    from regmw.jobs import Job

    from .migrate import JOB_NAME, job

    return [Job(JOB_NAME, job, max_retries=config["migration_job"]["max_retries"],
                description="copy one repository old → new, verify, mark new, announce")]


@hookimpl
def regmw_classifier(config, services: Services) -> Classifier | None:
    """``services.classifier``, built after the cache and storage it reads (None when disabled)."""
    section = config["migration"]
    if not section["enabled"]:
        return None
    if section["old_root"] == section["new_root"]:
        raise ConfigError(f"{config.source}: migration.new_root must differ from migration.old_root")
    if services.storage is None:
        raise ConfigError(f"{config.source}: migration needs a storage backend (the gcs plugin or [storage])")
    return Classifier(services, section)


@hookimpl
def regmw_prefetch(config, services: Services):
    """Declare the classification's cache key: read on the request's way in by a one-round-trip admission."""
    classifier = services.classifier
    return [classifier.prefetch_key] if isinstance(classifier, Classifier) else []


@hookimpl
def regmw_classify(context):
    """Ask ``services.classifier`` (this plugin's, or one a third-party plugin provides) and say what it decided."""
    classifier = context.services.classifier
    if classifier is None:
        return None
    path = classifier.classify(context)
    if path is not None and context.services.config["migration"]["response_header"]:
        context.response_headers.append((HEADER, path))
    return path


@hookimpl
def regmw_finish(context, status):
    """Hook-driven invalidation: the app set ``environ["regmw.migrated"]`` on a request it served well."""
    if not context.environ.get(MIGRATED_ENVIRON_KEY) or not status or status >= 400 or not context.repository:
        return
    classifier = context.services.classifier
    if classifier is not None:
        classifier.mark_migrated(context.repository)


@hookimpl
def regmw_cli_commands():
    from .cli import migrate_mark
    from .migrate_cli import migrate

    return [migrate_mark, migrate]
