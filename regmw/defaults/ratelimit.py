"""Rate limiting on the ``limits`` library: rules, keys, and the default limiter.

Rules come from ``[ratelimit] rules``; each counts requests by one identity
(client address, repository, token subject, or globally), optionally only for
reads or writes. The limiter here uses ``limits``' storage by URI and its
strategies, so the same class serves ``memory://`` (the embedded default),
``redis://`` and ``redis+sentinel://``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from collections.abc import Iterator
from typing import TYPE_CHECKING

import limits
from limits.storage import storage_from_string
from limits.strategies import STRATEGIES

from regmw.backends import RateLimitResult, tightest
from regmw.config import Option, Section
from regmw.plugins import hookimpl

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
        rules.append(Rule(str(table.get("name") or f"{by}-{methods}-{index}"), by, items, methods))
    return rules


def check_rules(value: list[dict]) -> list[dict]:
    parse_rules(value)
    return value


class LimitsRateLimiter:
    """Counts a request against every matching rule with a ``limits`` strategy."""

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


SECTION = Section(
    "ratelimit",
    "Distributed rate limits. Counted in memory by default; in Redis when the redis plugin is enabled.",
    {
        "enabled": Option("bool", True, "Apply the rules below (no rules = no limiting)."),
        "rules": Option(
            "table-list",
            [],
            'Rules, each `{by = "client"|"repository"|"subject"|"global", limit = "100/minute", '
            'methods = "any"|"read"|"write", name = "..."}`. Several limits may be joined with `;`.',
            check=check_rules,
        ),
        "strategy": Option(
            "str", "fixed-window", "The `limits` strategy.", choices=tuple(sorted(STRATEGIES))
        ),
        "fail_open": Option(
            "bool", True, "When the counter store is down: true lets requests through (counted in metrics), false answers 503."
        ),
    },
)


@hookimpl
def regmw_config_sections():
    return [SECTION]


@hookimpl
def regmw_rate_limiter(config):
    section = config["ratelimit"]
    if not section["enabled"] or not section["rules"]:
        return None
    return LimitsRateLimiter(parse_rules(section["rules"]), "memory://", section["strategy"])
