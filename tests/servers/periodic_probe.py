"""A periodic job that checks the cluster cap itself, through its fencing tokens (a test plugin).

Enabled by module path (``[regmw] plugins = [..., "tests.servers.periodic_probe"]``).
While it holds a slot of ``probe`` (N = ``[probe] instances``), it loops:
``context.check()`` (stop at once when the slot is lost), then records
``<token>:<pid>`` in a sorted set scored by a short expiry, drops expired
members and counts the live ones. More than N live holders is written to a
violations list. A member lives ``live_ms`` after its holder's last turn:
far less than the slot's lease, so a SIGKILLed holder's entry is gone before
anyone can take its slot, while a live holder refreshes it every turn.
"""
from __future__ import annotations

import os
import time

from regmw.config import Option, Section
from regmw.jobs import Job, JobContext
from regmw.plugins import hookimpl

SECTION = Section("probe", "Test plugin: the cluster-cap probe.", {
    "instances": Option("int", 2, "N."),
    "lease_ttl": Option("float", 1.5, "Slot lease."),
    "every": Option("float", 0.1, "Turn interval."),
    "live_ms": Option("int", 300, "How long a turn's entry lives."),
    "prefix": Option("str", "probe", "Redis key prefix."),
})


def keys(prefix: str) -> tuple[str, str, str]:
    return f"{prefix}:live", f"{prefix}:violations", f"{prefix}:tokens"


@hookimpl
def regmw_config_sections():
    return [SECTION]


@hookimpl
def regmw_jobs(config):
    section = config["probe"]
    live, violations, tokens = keys(section["prefix"])

    def run(context: JobContext) -> None:
        client = context.services.redis.client
        member = f"{context.lease.token}:{os.getpid()}"
        client.rpush(tokens, member)
        while True:
            context.check()  # the slot is still ours: the next side effect is allowed
            now = int(time.time() * 1000)
            pipe = client.pipeline()
            pipe.zadd(live, {member: now + section["live_ms"]})
            pipe.zremrangebyscore(live, "-inf", now)
            pipe.zrange(live, 0, -1)
            holders = pipe.execute()[2]
            if len(holders) > section["instances"]:
                client.rpush(violations, f"{now} {sorted(h.decode() for h in holders)}")
            context.stop.wait(0.05)

    return [Job("probe", run, every=section["every"], instances=section["instances"], lease_ttl=section["lease_ttl"])]
