"""The regmw hook catalogue (pluggy project ``regmw``).

Two kinds, in the order a request meets them:

*Provider hooks* run once at start-up, in the order below, and return a
named service (see :mod:`regmw.backends`) that lands in ``services.<name>``
for the providers after it and for every request. They are ``firstresult``:
the most recently registered plugin that returns something wins, so an
enabled plugin (``redis``) overrides the embedded default, and a third-party
plugin overrides both; a wrapper (``@hookimpl(wrapper=True)``) receives the
chosen one and may wrap it. Plugins meet only through these services and
hooks, never through each other's modules.

*Decision hooks* run per API request whose path parsed (a repository name
that fails the grammar never reaches them; ``/v2/`` and ``/v2/_catalog`` do,
with ``context.repository`` None, and skip ``regmw_classify``), in this order::

    regmw_admit → regmw_classify → regmw_route_db → (the app) →
    regmw_response_started → regmw_finish

Implement a hook with the ``regmw.hookimpl`` marker::

    from regmw import hookimpl, Refusal

    @hookimpl
    def regmw_admit(context):
        if context.repository and context.repository.startswith("quarantine/"):
            return Refusal(403, "DENIED", "repository is quarantined")

Every hook is documented with an example in docs/hooks.md.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("regmw")


# --- start-up -------------------------------------------------------------


@hookspec
def regmw_config_sections():
    """Return a list of :class:`regmw.config.Section` this plugin reads.

    Sections not declared by any loaded plugin are refused at start-up, so a
    misspelled ``[rdis]`` is an error, not a silently ignored table.
    """


@hookspec(firstresult=True)
def regmw_redis(config):
    """Return the shared :class:`~regmw.backends.RedisConnection` (``services.redis``), or None.

    The ``redis`` plugin provides it; later providers (cache, locks, the
    position store, ...) find it in ``services.redis``. Build the client
    without connecting: checking a configuration must open no connection.
    """


@hookspec(firstresult=True)
def regmw_cache(config, services):
    """Return the shared :class:`~regmw.backends.Cache`. Default: bounded in-process LRU+TTL."""


@hookspec(firstresult=True)
def regmw_lock_manager(config, services):
    """Return the :class:`~regmw.backends.LockManager`. Default: in-process locks."""


@hookspec(firstresult=True)
def regmw_rate_limiter(config, services):
    """Return the :class:`~regmw.backends.RateLimiter`, or None when no rules are configured.

    To add a limiter without dropping the configured one, wrap this hook
    (``@hookimpl(wrapper=True)``: ``inner = yield``) and return
    ``CompositeRateLimiter(inner, yours)``.
    """


@hookspec(firstresult=True)
def regmw_storage(config, services):
    """Return the :class:`~regmw.backends.Storage` used for existence checks. Default: filesystem."""


@hookspec(firstresult=True)
def regmw_classifier(config, services):
    """Return the :class:`~regmw.backends.Classifier` (``services.classifier``), or None when not migrating."""


@hookspec(firstresult=True)
def regmw_position_store(config, services):
    """Return the :class:`~regmw.backends.PositionStore` of write positions (``services.positions``), or None."""


@hookspec(firstresult=True)
def regmw_event_sink(config, services):
    """Return the :class:`~regmw.backends.EventSink` that receives registry events, or None.

    ``services.events`` is the result. ``emit(event)`` must make the event
    durable before it returns (or raise): the caller emits before the client
    sees the response. A plugin adds a sink or filters events by wrapping this
    hook (``@hookimpl(wrapper=True)``: take the inner sink from ``yield`` and
    return a sink that forwards to it).
    """


@hookspec
def regmw_jobs(config):
    """Return a list of :class:`regmw.jobs.Job` declarations this plugin runs.

    A job is ``run(context, **kwargs)``; it is enqueued by name through
    ``services.jobs.enqueue(name, **kwargs)`` (kwargs are JSON) and may run
    more than once, so it must be idempotent. A job with ``every`` set is
    periodic: each worker runs it every ``every`` seconds while holding one of
    its ``instances`` slots of the cluster semaphore (``context.lease``);
    ``context.check()`` raises once the slot is lost, before the next side
    effect. See docs/jobs.md.
    """


@hookspec
def regmw_batched_migrations(config):
    """Return a list of :class:`regmw.batched.BatchedMigration` declarations.

    Each is a batch function ``run(connection, start, stop)`` over an integer
    key range of one table. The ``db-migrations`` plugin stores their state on
    the primary, runs each batch as a job and slows or pauses while replicas
    lag (``regmw db-migrations run|status|pause|resume``; docs/db-migrations.md).
    """


@hookspec(firstresult=True)
def regmw_job_queue(config, services):
    """Return the :class:`~regmw.backends.JobQueue` (``services.jobs``).

    Default: the embedded SQLite queue run in-process; the ``jobs`` plugin
    provides dramatiq on the shared Redis (``services.redis``). Called after
    the event sink, so a job can emit events.
    """


@hookspec
def regmw_prefetch(config, services):
    """Return a list of functions ``context -> cache key | None`` to read on each request's way in.

    Every plugin's list is collected into ``services.prefetch`` before the
    admission is built. An admission that reads the cache anyway (the Redis
    one) reads each key in the same round trip into ``context.prefetched[key]``
    (None: a known miss); a hook then finds it there instead of asking the cache.
    """


@hookspec(firstresult=True)
def regmw_admission(config, services):
    """Return the :class:`~regmw.backends.Admission` that runs rate limits and read-only checks.

    Called after every other provider above, with their results in
    ``services``. An admission states what it ``covers`` of
    ``{"ratelimit", "readonly"}``; start-up runs what it does not cover
    around it. To add a check to whichever admission was chosen, wrap this
    hook (``@hookimpl(wrapper=True)``: ``inner = yield``) and delegate.
    """


@hookspec(firstresult=True)
def regmw_db_router(config, services):
    """Return a database router (see docs/database-routing.md), or None for no routing."""


@hookspec
def regmw_startup(services):
    """Called once when every backend is built; start background work here."""


@hookspec
def regmw_cli_commands():
    """Return a list of click commands or groups to add to the ``regmw`` command line.

    Called when the command line starts, with the plugins the configuration
    loads, so a plugin's commands exist exactly when the plugin is enabled. A
    command gets the configured runtime from :func:`regmw.cli.get_runtime`,
    accepts ``-c`` after its name with :func:`regmw.cli.config_option`, and
    refuses with :class:`regmw.cli.Failure` (one line, an exit code). A later
    plugin's command replaces an earlier one of the same name; the core's own
    commands (``serve``, ``check-config``, ...) cannot be replaced.
    """


# --- per request ------------------------------------------------------------


@hookspec(firstresult=True)
def regmw_admit(context):
    """Return a :class:`regmw.Refusal` to refuse the request, or None to let it through.

    The first refusal wins; later implementations are not called. The default
    implementation (registered first, so called last) runs the configured
    :class:`~regmw.backends.Admission`: rate limits, then the read-only check.
    """


@hookspec(firstresult=True)
def regmw_classify(context):
    """Return ``"old"`` or ``"new"`` for the request's repository, or None when not migrating.

    Raise :class:`regmw.Refusal` (e.g. 503 UNAVAILABLE) when the decision cannot
    be made; a request is never routed on a guess.
    """


@hookspec(firstresult=True)
def regmw_route_db(context):
    """Return the database handle the app should use (``environ["regmw.db"]``), or None."""


@hookspec
def regmw_response_started(context, status, headers):
    """Called when the app starts its response, BEFORE the client sees any of it.

    ``headers`` is the mutable list of ``(name, value)`` pairs about to be sent:
    append to add headers. Work that a follow-up request must observe (recording
    the WAL position of a write) belongs here, not in ``regmw_finish``. Not
    called for refusals. An exception is logged with the plugin's name; the
    response goes on and the other plugins' implementations still run.
    """


@hookspec
def regmw_finish(context, status):
    """Called after the response body was sent and closed (or the request was refused).

    ``status`` is the status sent; an app that raised counts as 500 (503 for
    a ``BackendUnavailable`` raised before its response started). Use it for
    work the client need not wait for: metrics, cache invalidation, returning
    connections (an event that must not be lost is stored earlier, in
    ``regmw_response_started``, as the notifications plugin does). Exceptions are logged, never sent to the client, and the
    other plugins' implementations still run.
    """
