"""Rate limiting: rules in ``limits``' syntax, the embedded bounded limiter, and the ``limits`` one.

Rules come from ``[ratelimit] rules``; each counts requests by one identity
(client address, repository, token subject, or globally), optionally only for
reads or writes, with limits written as ``limits.parse_many`` reads them
(``"100/minute;1000/hour"``).

Two limiters count them:

- :class:`MemoryRateLimiter`, the embedded default: a counter table of its
  own, bounded by ``[ratelimit] max_bytes`` (least recently used counters go
  first, with the cache's accounting, :class:`~regmw.defaults.memory_cache.LRUBook`).
  It replaces ``limits``' ``MemoryStorage``, which starts a timer thread every
  10 ms that rescans every key under the GIL and frees keys only when they
  expire: fed 100,000 repository names, a server on it slowed down and grew
  without bound. Here a hit is one lock, one dict look-up and a few
  additions, whatever the number of keys (docs/performance.md has the figures).
- :class:`LimitsRateLimiter`: ``limits``' strategies over a storage chosen by
  URI (the Redis plugin's ``hot_path = "limits"``, which keeps every strategy).

Both expose ``rules`` and ``declarative = True``: the rules are plain data that
another store may count instead (the Redis plugin's one-round-trip admission
counts the same rules in its script).
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import limits
from limits.storage import storage_from_string
from limits.strategies import STRATEGIES

from regmw.backends import RateLimitResult, tightest
from regmw.config import Option, Section
from regmw.errors import ConfigError
from regmw.plugins import hookimpl

from .memory_cache import LRUBook

if TYPE_CHECKING:
    from regmw.context import RequestContext

IDENTITIES = ("client", "repository", "subject", "global")
METHOD_CLASSES = ("any", "read", "write")


@dataclass(frozen=True)
class Rule:
    name: str
    by: str
    items: tuple[limits.RateLimitItem, ...]
    methods: str = "any"

    def identity(self, context: RequestContext) -> str | None:
        """The value this rule counts under for ``context``, or None if it does not apply."""
        if self.methods == "write" and not context.is_write:
            return None
        if self.methods == "read" and context.is_write:
            return None
        if self.by == "client":
            return context.client
        if self.by == "repository":
            return context.repository
        if self.by == "subject":
            return context.subject
        return "*"


def parse_rules(tables: list[dict]) -> list[Rule]:
    """Validate ``[[ratelimit.rules]]`` tables; raises ValueError naming the rule."""
    rules = []
    for index, table in enumerate(tables):
        where = f"rules[{index}]"
        unknown = set(table) - {"name", "by", "limit", "methods"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        by = table.get("by", "client")
        if by not in IDENTITIES:
            raise ValueError(f"{where}.by must be one of {', '.join(IDENTITIES)}")
        methods = table.get("methods", "any")
        if methods not in METHOD_CLASSES:
            raise ValueError(f"{where}.methods must be one of {', '.join(METHOD_CLASSES)}")
        try:
            items = tuple(limits.parse_many(str(table["limit"])))
        except KeyError:
            raise ValueError(f"{where}.limit is required (e.g. \"100/minute\")") from None
        except ValueError:
            raise ValueError(f"{where}.limit {table['limit']!r} is not a limit like \"100/minute\"") from None
        # A rule's name and a limit's text are its counters' key in Redis (limits' key_for): a
        # repeated limit would be counted twice there per request, once per limit in memory.
        windows = [item.key_for() for item in items]
        if len(set(windows)) != len(windows):
            raise ValueError(f"{where}.limit {table['limit']!r} repeats a limit")
        name = str(table.get("name") or f"{by}-{methods}-{index}")
        if any(char in name for char in "/{}"):
            # Redis keys are "LIMITER/<name>/<identity>/<limit>": with a "/" in a name, rule "r/group"
            # counting repository "app" and rule "r" counting "group/app" share one counter; a brace
            # would make the name a Redis Cluster hash tag.
            raise ValueError(f"{where}.name {name!r} contains '/', '{{' or '}}' (a name is part of its counters' keys)")
        if any(rule.name == name for rule in rules):
            # Two rules of one name would share their counters in Redis, not in memory.
            raise ValueError(f"{where}.name {name!r} is already the name of another rule (names must be unique)")
        rules.append(Rule(name, by, items, methods))
    return rules


def check_rules(value: list[dict]) -> list[dict]:
    parse_rules(value)
    return value


#: Strategies the embedded limiter counts; ``moving-window`` keeps a timestamp
#: per admitted request (up to the limit per key), which a byte cap per counter
#: cannot hold, so it is refused at start-up (the Redis plugin's
#: ``hot_path = "limits"`` has it).
MEMORY_STRATEGIES = ("fixed-window", "sliding-window-counter")

#: Bytes charged per counter on top of its identity's characters: the key tuple,
#: the identity str's header, the counter list and its numbers, the OrderedDict
#: slot and link and the hash table's spare room. Measured with tracemalloc on
#: CPython 3.11 (tests/test_ratelimit.py holds a million keys under the cap with
#: it); generous on purpose, like the cache's ENTRY_OVERHEAD.
COUNTER_OVERHEAD = 360


def _counter_cost(key: tuple[int, str], counter: list) -> int:
    return len(key[1]) + COUNTER_OVERHEAD


class MemoryRateLimiter:
    """The embedded limiter: exact per process, O(1) per request, memory bounded by ``max_bytes``.

    One counter per (limit, identity), kept in least-recently-used order. A hit
    takes the table's lock once for all the request's limits, so threads never
    admit more than a limit between them. A counter evicted to stay under the
    cap (the least recently used, so the coldest key) starts again from zero
    the next time its key is seen: the limit holds while a key's counter is
    resident, which a cap sized for the hot keys keeps true for them.

    ``fixed-window`` counts like ``limits`` (the window opens at a key's first
    hit; refused hits are counted too, as the Redis script does);
    ``sliding-window-counter`` weights the previous window like ``limits``,
    with windows opening at a key's first hit as in ``limits``' Redis storage
    (its memory storage aligns them on the clock instead, which decides
    differently); a refused hit is not counted.
    """

    declarative = True  # capability: ``rules`` may be counted by another store
    shared = False  # capability: counts seen by this process only

    def __init__(
        self,
        rules: list[Rule],
        strategy: str = "fixed-window",
        max_bytes: int = 32 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if strategy not in MEMORY_STRATEGIES:
            raise ValueError(
                f"strategy {strategy!r} is not supported by the embedded rate limiter "
                f"(one of: {', '.join(MEMORY_STRATEGIES)}; moving-window needs the redis plugin's hot_path = \"limits\")"
            )
        self.rules = rules
        self.strategy = strategy
        self.max_bytes = max_bytes
        self._clock = clock
        self._sliding = strategy == "sliding-window-counter"
        self._book = LRUBook(1 << 62, max_bytes, _counter_cost)
        self._lock = threading.Lock()
        # Per rule, its limits as (table index, amount, window seconds): built once.
        index = 0
        self._plan: list[tuple[Rule, list[tuple[int, int, float]]]] = []
        for rule in rules:
            limits_of_rule = []
            for item in rule.items:
                limits_of_rule.append((index, item.amount, float(item.get_expiry())))
                index += 1
            self._plan.append((rule, limits_of_rule))

    @property
    def counters(self) -> int:
        """Counters held now (no ``__len__``: an empty limiter must stay truthy)."""
        return len(self._book.data)

    @property
    def size_bytes(self) -> int:
        """Bytes charged for the counters held now (never above ``max_bytes``)."""
        return self._book.bytes

    def hit(self, context: RequestContext) -> RateLimitResult:
        """Count the request against each matching limit, the first refusal stopping the counting.

        Returns the first refusal, else the limit with the fewest requests left
        (:func:`~regmw.backends.tightest`'s choice), built once: a result object
        per counted limit would cost more than the counting.
        """
        wanted = [(rule.name, rule_limits, identity) for rule, rule_limits in self._plan
                  if (identity := rule.identity(context)) is not None]
        if not wanted:
            return _UNLIMITED
        count = self._count_sliding if self._sliding else self._count_fixed
        with self._lock:
            allowed, amount, remaining, reset, name = count(wanted, self._clock())
        return RateLimitResult(allowed, amount, remaining, reset, name)

    def _count_fixed(self, wanted: list, now: float) -> tuple[bool, int, int, float, str]:
        book = self._book
        data = book.data
        chosen = None
        for name, rule_limits, identity in wanted:
            for index, amount, expiry in rule_limits:
                key = (index, identity)
                counter = data.get(key)  # [window end, hits in it]
                if counter is None:
                    counter = [now + expiry, 1]
                    book.add(key, counter)
                else:
                    data.move_to_end(key)
                    if counter[0] <= now:
                        counter[0], counter[1] = now + expiry, 1
                    else:
                        counter[1] += 1
                remaining = amount - counter[1]
                if remaining < 0:
                    return False, amount, remaining, counter[0] - now, name
                if chosen is None or remaining < chosen[2]:
                    chosen = (True, amount, remaining, counter[0] - now, name)
        return chosen

    def _count_sliding(self, wanted: list, now: float) -> tuple[bool, int, int, float, str]:
        book = self._book
        data = book.data
        chosen = None
        for name, rule_limits, identity in wanted:
            for index, amount, expiry in rule_limits:
                key = (index, identity)
                counter = data.get(key)  # [end of the current window, hits in it, hits in the one before]
                if counter is None:
                    counter = [now + expiry, 0, 0]
                    book.add(key, counter)
                else:
                    data.move_to_end(key)
                    if now >= counter[0]:
                        if now < counter[0] + expiry:  # the next window: the current one becomes the previous
                            counter[0], counter[1], counter[2] = counter[0] + expiry, 0, counter[1]
                        else:  # both windows are over (their Redis keys expired): start again at this hit
                            counter[0], counter[1], counter[2] = now + expiry, 0, 0
                previous_left = counter[0] - now  # how long the previous window still weighs
                weighted = math.floor(counter[2] * previous_left / expiry + counter[1])
                allowed = weighted < amount
                if allowed:
                    counter[1] += 1
                    weighted += 1
                # when one request's worth frees up (as limits reports it)
                reset = previous_left % (expiry / counter[2]) if counter[2] else previous_left
                if not allowed:
                    return False, amount, amount - weighted, reset, name
                if chosen is None or amount - weighted < chosen[2]:
                    chosen = (True, amount, amount - weighted, reset, name)
        return chosen


_UNLIMITED = RateLimitResult(True)


class LimitsRateLimiter:
    """Counts a request against every matching rule with a ``limits`` strategy."""

    declarative = True

    def __init__(self, rules: list[Rule], storage_uri: str = "memory://", strategy: str = "fixed-window", **storage_options):
        self.rules = rules
        self.storage = storage_from_string(storage_uri, **storage_options)
        self.strategy = STRATEGIES[strategy](self.storage)

    def hit(self, context: RequestContext) -> RateLimitResult:
        return tightest(self._count(context)) or RateLimitResult(True)

    def _count(self, context: RequestContext) -> Iterator[RateLimitResult]:
        """Count the request against each matching limit, lazily: a refusal stops the counting."""
        for rule in self.rules:
            identity = rule.identity(context)
            if identity is None:
                continue
            for item in rule.items:
                allowed = self.strategy.hit(item, rule.name, identity)
                stats = self.strategy.get_window_stats(item, rule.name, identity)
                yield RateLimitResult(
                    allowed, item.amount, stats.remaining, max(0.0, stats.reset_time - time.time()), rule.name
                )


def embedded_counts_the_strategy(section, config) -> str | None:
    """`strategy` = `moving-window` with rules needs a plugin's rate limiter (the redis plugin's `hot_path` = `limits`): the embedded limiter does not count it."""
    # Checked with the configuration (check-config, serve's master), not only when the workers build
    # the limiter: there it was a traceback per worker and "Worker failed to boot".
    if not (section["enabled"] and section["rules"]) or section["strategy"] in MEMORY_STRATEGIES:
        return None
    if config is not None and "redis" in getattr(config, "sections", {}):
        return None  # the redis plugin's limiter counts it (its own check asks for hot_path = "limits")
    return (f"ratelimit.strategy {section['strategy']!r} is not counted by the embedded rate limiter "
            f"(one of: {', '.join(MEMORY_STRATEGIES)}; {section['strategy']} needs the redis plugin with "
            'hot_path = "limits")')


SECTION = Section(
    "ratelimit",
    "Distributed rate limits. Counted in memory by default; in Redis when the redis plugin is enabled.",
    {
        "enabled": Option("bool", True, "Apply the rules below (no rules = no limiting)."),
        "rules": Option(
            "table-list",
            [],
            'Rules, each `{by = "client"|"repository"|"subject"|"global", limit = "100/minute", '
            'methods = "any"|"read"|"write", name = "..."}`. Several limits may be joined with `;`. '
            'Names are unique, without `/`, `{` or `}` (a rule\'s name and limits name its counters in Redis).',
            check=check_rules,
        ),
        "strategy": Option(
            "str", "fixed-window",
            "The `limits` strategy. The embedded limiter counts fixed-window and sliding-window-counter "
            '(moving-window needs the redis plugin with `hot_path = "limits"`).',
            choices=tuple(sorted(STRATEGIES)),
        ),
        "max_bytes": Option(
            "int", 32 * 1024 * 1024,
            "Embedded limiter only: most bytes of counters kept in memory (identity + ~360 B each); "
            "the least recently used go first. 32 MiB holds about 90,000 counters.",
            minimum=4096,
        ),
        "fail_open": Option(
            "bool", True, "When the counter store is down: true lets requests through (counted in metrics), false answers 503."
        ),
    },
    checks=(embedded_counts_the_strategy,),
)


@hookimpl
def regmw_config_sections():
    return [SECTION]


@hookimpl
def regmw_rate_limiter(config):
    section = config["ratelimit"]
    if not section["enabled"] or not section["rules"]:
        return None
    try:
        return MemoryRateLimiter(parse_rules(section["rules"]), section["strategy"], section["max_bytes"])
    except ValueError as exc:
        raise ConfigError(f"{getattr(config, 'source', '<config>')}: ratelimit.strategy: {exc}") from None
