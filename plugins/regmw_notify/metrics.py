"""Prometheus metrics of the notifications plugin (in regmw's registry, served at ``metrics_path``)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge

from regmw.metrics import REGISTRY

enqueued = Counter("regmw_notify_events_total", "Events emitted, by where they were made durable.",
                   ["where"], registry=REGISTRY)  # stream | spool | queue
deliveries = Counter("regmw_notify_deliveries_total", "Delivery attempts (POSTs), by endpoint and outcome.",
                     ["endpoint", "outcome"], registry=REGISTRY)  # delivered | failed | gone
delivered_events = Counter("regmw_notify_delivered_events_total", "Events acknowledged by a 2xx, by endpoint.",
                           ["endpoint"], registry=REGISTRY)
retries = Counter("regmw_notify_retries_total", "Failed attempts that were scheduled for a retry.", ["endpoint"],
                  registry=REGISTRY)
parked = Counter("regmw_notify_parked_total", "Events parked in the dead-letter stream after max_age.",
                 ["endpoint"], registry=REGISTRY)
depth = Gauge("regmw_notify_queue_depth", "Events not yet acknowledged, by shard and endpoint.",
              ["shard", "endpoint"], registry=REGISTRY)
lag = Gauge("regmw_notify_lag_seconds", "Age of the oldest event waiting at a lane's head, by shard and endpoint.",
            ["shard", "endpoint"], registry=REGISTRY)
spooled = Gauge("regmw_notify_spooled", "Events in this process's on-disk spool waiting for Redis.",
                registry=REGISTRY)
