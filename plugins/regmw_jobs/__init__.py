"""regmw built-in plugin ``jobs``: background jobs on dramatiq with its Redis broker.

Enable with ``[regmw] plugins = ["redis", "jobs"]``: ``services.jobs`` becomes
a :class:`.queue.DramatiqJobQueue` on the shared Redis connection
(``services.redis``), and ``regmw worker`` runs dramatiq workers for every job
declared through ``regmw_jobs``. dramatiq acknowledges a message only after
the job ran, requeues the messages of a worker whose heartbeat stopped
(``[jobs] heartbeat_timeout``), retries with exponential backoff and keeps
messages that ran out of retries in its dead-letter queue. Without this plugin
the embedded SQLite queue (:mod:`regmw.defaults.jobs`) runs the same jobs.
On a Redis Cluster every key of the queue lives in one slot (the namespace is
a hash tag): dramatiq's Lua scripts build their key names from the namespace.
"""
from __future__ import annotations

from regmw.errors import ConfigError
from regmw.jobs import collect_jobs
from regmw.plugins import hookimpl


@hookimpl
def regmw_job_queue(config, services):
    """dramatiq on ``services.redis`` (built without connecting: the first command connects).

    On a Redis Cluster the broker's namespace becomes a hash tag (see
    :func:`.queue.broker_namespace`), so dramatiq's multi-key scripts run.
    """
    connection = services.redis
    if connection is None:
        raise ConfigError(f"{config.source}: the jobs plugin needs the redis plugin ([regmw] plugins = "
                          "[\"redis\", \"jobs\"])")
    from .queue import DramatiqJobQueue

    return DramatiqJobQueue(services, config["jobs"], collect_jobs(config, services.pm))
