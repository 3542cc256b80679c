"""The core's own configuration and default decision hooks.

``regmw_admit`` here runs the configured :class:`~regmw.backends.Admission`;
the default admission counts the request against the rate limiter and checks
the repository's read-only lock, each with its own failure policy. Start-up
completes whatever admission the plugins chose with the checks it does not
``cover`` (:func:`complete_admission`), and refuses a rate limiter that would
silently drop the configured rules (:func:`check_rate_limiter`).
"""
from __future__ import annotations

import fnmatch
import logging

from regmw import metrics
from regmw.backends import ADMISSION_PARTS, Services, split_limiter
from regmw.config import Option, Section
from regmw.errors import ConfigError, Refusal, too_many_requests, unavailable
from regmw.plugins import hookimpl
from regmw.tokens import check_auth

log = logging.getLogger("regmw.admission")


class RateLimitCheck:
    """Count the request against the rate limiter; refuse when a limit is exceeded (or per ``fail_open``)."""

    def __init__(self, services: Services) -> None:
        self.rate_limiter = services.rate_limiter
        self.fail_open = services.config["ratelimit"]["fail_open"]

    def __call__(self, context) -> Refusal | None:
        try:
            result = self.rate_limiter.hit(context)
        except Exception as exc:  # any limiter's store failure gets the configured policy
            return ratelimit_store_down(exc, self.fail_open)
        context.response_headers.extend(result.headers())
        return refused_by_limit(result) if not result.allowed else None


class ReadOnlyCheck:
    """Refuse a write to a repository that is read-only (or per ``[readonly]`` when the lock store is down)."""

    def __init__(self, services: Services) -> None:
        self.locks = services.locks
        self.policy = services.config["readonly"]

    def __call__(self, context) -> Refusal | None:
        if not (context.is_write and context.repository):
            return None
        try:
            locked = self.locks.read_only(context.repository)
        except Exception as exc:  # any lock store's failure gets the configured policy
            return readonly_store_down(exc, context.repository, self.policy)
        return read_only_refusal(context.repository, self.policy["retry_after"]) if locked else None


class SequentialAdmission:
    """Rate limit, then read-only check: one backend call each (the in-process default)."""

    covers = ADMISSION_PARTS

    def __init__(self, services: Services) -> None:
        self.rate_limit = RateLimitCheck(services) if services.rate_limiter is not None else None
        self.read_only = ReadOnlyCheck(services)

    def admit(self, context) -> Refusal | None:
        if self.rate_limit is not None:
            refusal = self.rate_limit(context)
            if refusal is not None:
                return refusal
        if context.is_write and context.repository:  # reads skip the call (the hot path of a registry)
            return self.read_only(context)
        return None


class CompletedAdmission:
    """An admission that decides only part of admission, with the core's checks for the rest around it.

    Rate limits run before it (a refused request is still counted, as with
    the default), the read-only check after it. ``inner`` is the admission
    the plugins chose; ``added`` what start-up added.
    """

    covers = ADMISSION_PARTS

    def __init__(self, inner, services: Services, added: frozenset[str]) -> None:
        self.inner = inner
        self.added = added
        self.rate_limit = RateLimitCheck(services) if "ratelimit" in added else None
        self.read_only = ReadOnlyCheck(services) if "readonly" in added else None

    def admit(self, context) -> Refusal | None:
        if self.rate_limit is not None:
            refusal = self.rate_limit(context)
            if refusal is not None:
                return refusal
        refusal = self.inner.admit(context)
        if refusal is not None or self.read_only is None:
            return refusal
        return self.read_only(context)


def check_rate_limiter(services: Services, provider: str) -> None:
    """Refuse a start-up where the chosen rate limiter would silently not count ``[ratelimit] rules``.

    A plugin that *replaces* the limiter (a plain ``regmw_rate_limiter``)
    drops the configured rules unless it counts them itself (and says so
    with ``rules``); one that *adds* a limiter wraps the hook and composes
    (:class:`regmw.backends.CompositeRateLimiter`), which keeps them.
    """
    section = services.config["ratelimit"]
    if not section["enabled"] or not section["rules"]:
        return
    from .ratelimit import parse_rules

    configured = [rule.name for rule in parse_rules(section["rules"])]
    declarative, _ = split_limiter(services.rate_limiter)
    counted = {rule.name for rule in declarative}
    missing = [name for name in configured if name not in counted]
    if missing:
        what = "no rate limiter" if services.rate_limiter is None else type(services.rate_limiter).__qualname__
        raise ConfigError(
            f"{getattr(services.config, 'source', '<config>')}: ratelimit.rules {', '.join(missing)} would not be "
            f"counted: plugin {provider} provides {what}, which does not count them; to add a limiter, wrap "
            "regmw_rate_limiter and return CompositeRateLimiter(inner, yours) (docs/hooks.md)"
        )


def complete_admission(admission, services: Services, provider: str = "?"):
    """``admission``, plus the core's rate-limit and read-only checks for what it does not ``cover``.

    Replacing the admission (the maintenance-window example of docs/hooks.md)
    must not switch rate limiting or read-only mode off without saying so: an
    admission that does not state ``covers`` gets both run around it. An
    admission that claims a part (``covers = frozenset({"ratelimit"})``)
    takes that part on itself.
    """
    if admission is None:  # every implementation declined (a wrapper returned None): the core's own
        return SequentialAdmission(services)
    covers = getattr(admission, "covers", None)
    if covers is None:
        covers = frozenset()
    unknown = set(covers) - ADMISSION_PARTS
    if unknown:
        raise ConfigError(
            f"regmw_admission: plugin {provider}: {type(admission).__qualname__}.covers names "
            f"{', '.join(sorted(unknown))}; known parts: {', '.join(sorted(ADMISSION_PARTS))}"
        )
    added = ADMISSION_PARTS - frozenset(covers)
    if services.rate_limiter is None:
        added -= {"ratelimit"}
    if not added:
        return admission
    log.info("admission %s (plugin %s) does not cover %s: the core checks it around it",
             type(admission).__qualname__, provider, " and ".join(sorted(added)))
    return CompletedAdmission(admission, services, frozenset(added))


def refused_by_limit(result) -> Refusal:
    return too_many_requests(f"rate limit {result.rule!r} exceeded", result.reset_seconds())


def read_only_refusal(repository: str, retry_after: int) -> Refusal:
    return unavailable("repository is read-only (migration in progress)", retry_after, {"name": repository},
                       reason="read_only")


def ratelimit_store_down(exc: BaseException, fail_open: bool) -> Refusal | None:
    metrics.report_backend_error("ratelimit", "fail_open" if fail_open else "fail_closed", exc, log)
    return None if fail_open else unavailable("rate limiting is unavailable", 5, reason="rate_limit_unavailable")


def readonly_store_down(exc: BaseException, repository: str, policy) -> Refusal | None:
    closed = policy["fail_closed_writes"] and any(
        fnmatch.fnmatchcase(repository, pattern) for pattern in policy["lockable"]
    )
    metrics.report_backend_error("readonly", "fail_closed" if closed else "fail_open", exc, log)
    if closed:
        return unavailable("cannot check the repository's read-only lock", policy["retry_after"], {"name": repository},
                           reason="read_only_unavailable")
    return None


def _absolute_path(value: str) -> str:
    if value and not value.startswith("/"):
        raise ValueError("must start with '/' (or be empty to disable)")
    return value


SECTIONS = [
    Section(
        "regmw",
        "The core: which plugins run and how clients are identified.",
        {
            "plugins": Option("list", [], "Built-in plugins to enable: migration, gcs, redis, jobs, dbroute, db-migrations, notifications "
                              "(or dotted module paths, e.g. `mycompany.regmw_hooks`)."),
            "entry_points": Option("bool", True, "Load third-party plugins from the `regmw` entry-point group."),
            "disable_plugins": Option("list", [], "Entry-point plugins (by entry-point name) not to load while the "
                                      "others still do, like pytest's `-p no:NAME`; `regmw plugins` lists the names."),
            "trusted_proxies": Option(
                "cidrs", [], "Networks whose X-Forwarded-For and Forwarded (RFC 7239) headers are believed (e.g. your load "
                "balancer), read right to left; hops may carry a port, and an IPv6 zone (`%eth0`) is dropped; `::ffff:a.b.c.d` (an IPv4 peer of a dual-stack "
                "`--host ::`) is `a.b.c.d`. The gateway passes a client's X-Forwarded-For on to its upstream only from "
                "these. Under `regmw serve` they are also the only peers whose X-Forwarded-Proto (-Ssl, -Protocol) sets "
                "the scheme the app sees, and whose SCRIPT_NAME header its mount point (gunicorn's `forwarded_allow_ips`; "
                "gunicorn's own default believes any loopback client). Empty: the socket peer only."
            ),
            "ipv6_prefix": Option(
                "int", 64, "IPv6 clients are counted per network of this prefix length.", minimum=1, maximum=128
            ),
            "metrics_path": Option(
                "str", "", "Path answering Prometheus metrics on the API port, only to `[serve] metrics_allow` networks "
                "(e.g. `/-/regmw/metrics`); empty: not on the API port (use `[serve] metrics_listen`).",
                check=_absolute_path
            ),
            "log_level": Option(
                "str", "INFO",
                "Log level of the `regmw` loggers when regmw is the process (`regmw serve`, `regmw.wsgi`); "
                "an app embedding regmw keeps its own logging configuration.",
                choices=("DEBUG", "INFO", "WARNING", "ERROR"),
            ),
        },
    ),
    Section(
        "auth",
        "Verification of registry bearer tokens (JWT). Claims of tokens that do not verify are ignored. "
        "A token verifies with a valid signature and an unexpired `exp` (required), plus `nbf` and `iat` (neither "
        "in the future), `iss` and `aud` when present or configured. One key verifies every token: a `kid` header "
        "is not looked at (any or none verifies against the key).",
        {
            "key": Option("str", None, "Verification key: an HMAC secret or a PEM public key."),
            "key_file": Option("path", None, "File holding the verification key (instead of `key`); its trailing line breaks are not part of the key."),
            "algorithms": Option("list", ["RS256", "ES256"], "Accepted JWT algorithms (`none` is never accepted)."),
            "issuer": Option("str", None, "Required `iss` claim."),
            "audience": Option("str", None, "Required `aud` claim. Unset: a token that carries an `aud` does not "
                               "verify (set it to the registry's service name, e.g. `container_registry`)."),
            "leeway": Option("float", 0.0, "Seconds of clock skew tolerated on `exp`/`nbf`/`iat`.", minimum=0),
        },
        checks=(check_auth,),
    ),
    Section(
        "readonly",
        "Per-repository read-only mode: writes to a locked repository get 503 UNAVAILABLE.",
        {
            "retry_after": Option("int", 60, "Retry-After seconds sent with a read-only refusal.", minimum=1),
            "fail_closed_writes": Option(
                "bool", True, "When the lock store is down, refuse writes to `lockable` repositories (reads always pass)."
            ),
            "lockable": Option("list", ["*"], "Glob patterns of repositories that can be locked (fail-closed applies to these)."),
            "confirm_writes": Option(
                "bool", True,
                "Before a write's success (201, or a 2xx DELETE) goes out, check again that its repository is not "
                "read-only and classifies to the same side as at admission; if it was locked or migrated while "
                "the write ran, answer 503 instead (the client retries), so a migration's copy never misses an "
                "acknowledged write. One more lock (and classification) look-up per successful write."),
        },
    ),
]


@hookimpl
def regmw_config_sections():
    return SECTIONS


@hookimpl
def regmw_admission(config, services):
    return SequentialAdmission(services)


@hookimpl
def regmw_admit(context):
    admission = context.services.admission
    return admission.admit(context) if admission is not None else None
