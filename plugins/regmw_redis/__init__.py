"""regmw built-in plugin ``redis``: Redis (single node or Sentinel) behind the cache, locks and rate limits.

Enable with ``[regmw] plugins = ["redis"]`` and configure ``[redis]``. The
hook implementations are attributes of this module (it is what the plugin
manager registers); the work lives in one small module per job:

- :mod:`.connection`: URL parsing, the shared client, key namespacing, round-trip counting;
- :mod:`.settings`: the ``[redis]`` section.

See docs/redis.md.
"""
from __future__ import annotations

from regmw.plugins import hookimpl

from .connection import namespaced, redis_client
from .settings import SECTION

__all__ = ["namespaced", "redis_client", "regmw_config_sections"]


@hookimpl
def regmw_config_sections():
    return [SECTION]
