"""regmw built-in plugin ``notifications``: webhook events never lost, in order per repository.

Enable with ``[regmw] plugins = ["redis", "notifications"]`` (or without
``redis``: the embedded SQLite queue) and list receivers in
``[notifications] endpoints``. One small module per job:

- :mod:`.events`: distribution's event format, built from a request;
- :mod:`.sink`: the event sink (``services.events``): XADD, or the on-disk spool;
- :mod:`.spool`: the SQLite (WAL) spool and embedded queue;
- :mod:`.stream`: stream keys, XADD/WAIT and the fenced Lua scripts;
- :mod:`.worker`, :mod:`.queues`, :mod:`.lane`: leased, ordered, at-least-once delivery;
- :mod:`.deliver`, :mod:`.signing`: the POST and its Standard Webhooks signature;
- :mod:`.endpoints`: endpoint settings, filters, the SSRF guard;
- :mod:`.cli`: ``regmw notifications ...``; :mod:`.metrics`: Prometheus.

Events of write requests are emitted in ``regmw_response_started``: before the
client sees the status, so an acknowledged push always has its event stored.
See docs/notifications.md.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from regmw.plugins import hookimpl

from .endpoints import parse_endpoints
from .metrics import enqueued
from .events import action_for, build_event, plugin_event
from .settings import SECTION
from .sink import NotifySink
from .stream import RedisStreams

__all__ = ["NotifySink", "plugin_event", "regmw_config_sections", "regmw_event_sink", "regmw_response_started",
           "regmw_startup"]

log = logging.getLogger("regmw.notify")
LOST = enqueued.labels("lost")


@hookimpl
def regmw_config_sections():
    return [SECTION]


def endpoints_of(config: Any) -> list:
    """The configured endpoints (the section's check already refused bad ones at validation)."""
    section = config["notifications"]
    return parse_endpoints(section["endpoints"], section["allowed_networks"])


def streams_of(config: Any, services: Any) -> RedisStreams | None:
    """The Redis streams, when a Redis connection is provided (``services.redis``); else None (embedded)."""
    connection = getattr(services, "redis", None)
    if connection is None:
        return None
    section = config["notifications"]
    return RedisStreams(connection, section["shards"], section["wait_replicas"], section["wait_timeout"])


@hookimpl
def regmw_event_sink(config, services):
    """The sink; its spool forwarder starts here, so it runs even when another plugin wraps the sink."""
    section = config["notifications"]
    sink = NotifySink(streams_of(config, services), section["spool_dir"], section["breaker_seconds"])
    sink.start()
    return sink


@hookimpl
def regmw_startup(services):
    """Start the in-process delivery thread when ``delivery_thread`` asks for it, in a serving process only.

    A CLI command (``regmw notifications dead-letters show``, ``regmw migrate``)
    builds the same runtime but must not deliver, park or drop events behind
    the operator's back.
    """
    section = services.config["notifications"]
    if not services.serving:
        return
    sink = services.events if isinstance(services.events, NotifySink) else None
    streams = sink.streams if sink is not None else streams_of(services.config, services)
    thread = section["delivery_thread"]
    if section["endpoints"] and (thread == "on" or (thread == "auto" and streams is None)):
        worker = make_worker(services, sink)
        stop = sink.closed if sink is not None else threading.Event()
        threading.Thread(target=worker.run, args=(stop,), name="regmw-notify-delivery", daemon=True).start()


def make_worker(services: Any, sink: NotifySink | None = None) -> Any:
    """The worker for this configuration: Redis shards under leases, or the embedded queue."""
    from .worker import EmbeddedWorker, Worker

    config = services.config
    section = config["notifications"]
    endpoints = endpoints_of(config)
    streams = sink.streams if sink is not None else streams_of(config, services)
    if streams is None:
        spool = sink.spool if sink is not None else NotifySink(None, section["spool_dir"]).spool
        return EmbeddedWorker(spool, endpoints, section["allowed_networks"])
    return Worker(streams, services.locks, endpoints, section["allowed_networks"], section["lease_ttl"],
                  section["claim_idle"], section["max_shards_per_worker"])


@hookimpl
def regmw_response_started(context, status, headers):
    """Emit the request's event, if it makes one, before the client sees the response.

    A failure to store it is logged and counted by the sink; it does not turn
    a successful push into an error the client would retry.
    """
    if context.repository is None:
        return
    services = context.services
    sink = services.events
    if sink is None:
        return
    action = action_for(context.method, context.resource, status, context.environ.get("QUERY_STRING", ""),
                        services.config["notifications"]["pulls"])
    if action is None:
        return
    try:
        sink.emit(build_event(context, status, headers, action))
    except Exception:
        LOST.inc()
        log.exception("event for %s %s could not be stored (Redis and the spool both failed)",
                      context.method, context.repository)


@hookimpl
def regmw_cli_commands():
    from .cli import notifications

    return [notifications]
