"""regmw built-in plugin ``dbroute``: PostgreSQL primary/replica routing with read-your-writes.

Enable with ``[regmw] plugins = ["dbroute"]`` and a ``[database]`` section.
Writes go to the primary; a read goes to a replica only when that replica is
known to have replayed the latest write recorded for the request's
repository. The rule and its failure behaviour: docs/database-routing.md.

Modules, one job each: :mod:`.config` (the section), :mod:`.lsn` (WAL
positions), :mod:`.store` (shared positions), :mod:`.discovery` (replica
list), :mod:`.nodes` (engines and queries), :mod:`.health` (lag, quarantine,
checker thread), :mod:`.router` (the rule), :mod:`.handle` (what the app
gets), :mod:`.flask` (session helper). The hook implementations below are
thin: they only hand the request to the router.
"""
from __future__ import annotations

from regmw.plugins import hookimpl

from .config import SECTION, settings_from_config
from .handle import DbHandle, PrimaryUnavailable, ReplicaLost
from .router import Router
from .store import make_store

__all__ = ["DbHandle", "PrimaryUnavailable", "ReplicaLost", "Router"]


@hookimpl
def regmw_config_sections():
    return [SECTION]


@hookimpl
def regmw_position_store(config, services):
    """``services.positions``: on the shared Redis (``services.redis``) when there is one, per ``[database] store``."""
    return make_store(settings_from_config(config["database"]), services.redis)


@hookimpl
def regmw_db_router(config, services):
    return Router(settings_from_config(config["database"]), services.positions)


@hookimpl
def regmw_startup(services):
    """Run the first health check (the checker thread starts with the first request of each process)."""
    router = services.db_router
    if isinstance(router, Router):
        router.start()


@hookimpl
def regmw_route_db(context):
    router = context.services.db_router
    if not isinstance(router, Router):
        return None
    return router.route(context.repository, context.is_write)


@hookimpl
def regmw_response_started(context, status, headers):
    """Record the write's WAL position BEFORE the client sees the response.

    Any write answer except a 4xx is recorded: a 4xx means the registry refused
    the write, while a 5xx may come after a commit and recording costs only a
    few primary reads.
    """
    if not (context.is_write and context.repository and isinstance(context.db, DbHandle)):
        return
    if 400 <= status < 500:
        return
    router = context.services.db_router
    if isinstance(router, Router):
        router.record_write(context.repository, context.db)


@hookimpl
def regmw_finish(context, status):
    """Return whatever the request's handle opened to the pools."""
    if isinstance(context.db, DbHandle):
        context.db.close()
