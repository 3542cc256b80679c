"""Start-up: read configuration, load plugins, validate, build the backends.

Everything that can be wrong with a configuration is found here, before the
first request, and reported as one :class:`~regmw.errors.ConfigError` line.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy

from .backends import Services
from .clients import ClientResolver
from .config import OPTION_TYPES, Config, Option, Section, env_overrides, load_toml, merge, validate
from .defaults.core import check_rate_limiter, complete_admission
from .errors import ConfigError, exception_line
from .plugins import manager_for
from .tokens import TokenVerifier


@dataclass
class Runtime:
    """A configured regmw: the validated config, the plugin manager and the backends."""

    config: Config
    pm: pluggy.PluginManager
    services: Services


def gather_sections(pm: pluggy.PluginManager) -> dict[str, Section]:
    """Every plugin's sections; a plugin's bad declaration is one ConfigError line naming the plugin."""
    sections: dict[str, Section] = {}
    for impl in pm.hook.regmw_config_sections.get_hookimpls():
        for section in _declared_sections(impl):
            if section.name in sections:
                raise ConfigError(f"config section [{section.name}] is declared twice ({impl.plugin_name})")
            if section.owner == "regmw" and not impl.plugin_name.startswith("regmw."):
                section = dataclasses.replace(section, owner=impl.plugin_name)
            sections[section.name] = section
    return sections


def _declared_sections(impl: Any) -> list[Section]:
    plugin = impl.plugin_name
    try:
        declared = impl.function()
    except Exception as exc:  # noqa: BLE001 - a plugin's bug: name the plugin, in one line
        raise ConfigError(f"plugin {plugin}: regmw_config_sections raised {exception_line(exc)}") from None
    if declared is None:
        return []
    if isinstance(declared, Section) or not isinstance(declared, Iterable) or isinstance(declared, (str, Mapping)):
        raise ConfigError(f"plugin {plugin}: regmw_config_sections must return a list of regmw.Section "
                          f"(got {type(declared).__name__})")
    declared = list(declared)
    for section in declared:
        if not isinstance(section, Section):
            raise ConfigError(f"plugin {plugin}: regmw_config_sections returned {type(section).__name__}, "
                              "not a regmw.Section")
        for key, option in section.options.items():
            if not isinstance(option, Option) or option.type not in OPTION_TYPES:
                what = f"type {option.type!r}" if isinstance(option, Option) else type(option).__name__
                raise ConfigError(f"plugin {plugin}: option {section.name}.{key} has an unknown {what} "
                                  f"(one of: {', '.join(OPTION_TYPES)})")
    return declared


def build(
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    plugins: Iterable[Any] = (),
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    serving: bool = False,
    source: str | None = None,
) -> Runtime:
    """Build a :class:`Runtime` from a TOML path or a dict, plus environment overrides.

    ``environ`` defaults to ``os.environ``; pass ``{}`` for a hermetic build.
    ``overrides`` (e.g. from Flask's ``app.config``) win over the file, and the
    environment wins over both. ``serving``: requests will be served with this
    runtime (``services.serving``, set before ``regmw_startup``, which starts
    in-process background work such as webhook delivery only then); a CLI
    command or a script builds without it. ``source``: what error lines call
    a dict ``config`` (the file it was read from), instead of ``<dict>``.
    """
    environ = os.environ if environ is None else environ
    if config is None:
        path = environ.get("REGMW_CONFIG")
        raw, source = (load_toml(path), str(path)) if path else ({}, "<defaults>")
    elif isinstance(config, Mapping):
        raw, source = dict(config), source or "<dict>"
    else:
        raw, source = load_toml(config), str(config)
    raw = merge(raw, overrides or {})

    pm = manager_for(raw, environ, plugins, source)
    sections = gather_sections(pm)
    validated = validate(merge(raw, env_overrides(sections, environ)), sections, source)
    return Runtime(validated, pm, build_services(validated, pm, serving))


def build_services(config: Config, pm: pluggy.PluginManager, serving: bool = False) -> Services:
    """Call the provider hooks once, in the contract's order, each seeing the services built before it.

    ``regmw_redis`` → cache, locks, rate limiter, storage → classifier →
    position store → event sink → job queue → every ``regmw_prefetch`` declaration → admission (which
    therefore sees all of them) → database router → ``regmw_startup``.
    """
    hook = pm.hook
    services = Services(
        config=config,
        pm=pm,
        token_verifier=TokenVerifier.from_config(config["auth"]),
        clients=ClientResolver(config["regmw"]["trusted_proxies"], config["regmw"]["ipv6_prefix"]),
        serving=serving,
    )
    services.redis = hook.regmw_redis(config=config)
    services.cache = hook.regmw_cache(config=config, services=services)
    services.locks = hook.regmw_lock_manager(config=config, services=services)
    services.rate_limiter = hook.regmw_rate_limiter(config=config, services=services)
    check_rate_limiter(services, provider_name(pm, services.rate_limiter))
    services.storage = hook.regmw_storage(config=config, services=services)
    services.classifier = hook.regmw_classifier(config=config, services=services)
    services.positions = hook.regmw_position_store(config=config, services=services)
    services.events = hook.regmw_event_sink(config=config, services=services)
    services.jobs = hook.regmw_job_queue(config=config, services=services)
    services.prefetch = collect_prefetch(hook.regmw_prefetch(config=config, services=services))
    admission = hook.regmw_admission(config=config, services=services)
    services.admission = complete_admission(admission, services, provider_name(pm, admission))
    services.db_router = hook.regmw_db_router(config=config, services=services)
    hook.regmw_startup(services=services)
    return services


def provider_name(pm: pluggy.PluginManager, backend: Any) -> str:
    """The registered name of the plugin whose module defines ``backend``'s class, for error lines only."""
    module = type(backend).__module__
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        if isinstance(plugin, types.ModuleType):
            if plugin.__name__ == module:
                return name
        elif type(plugin).__module__ == module:
            # objects registered in code get pluggy's id-number name: say what they are instead
            return f"{type(plugin).__qualname__} ({module})" if name == str(id(plugin)) else name
    return module


def collect_prefetch(declared: Iterable[Iterable[Any] | None]) -> tuple[Any, ...]:
    """Every plugin's prefetch key functions as one tuple (each function once)."""
    functions: list[Any] = []
    for group in declared:
        for function in group or ():
            if not callable(function):
                raise ConfigError(f"regmw_prefetch: {function!r} is not a function context -> cache key")
            if function not in functions:
                functions.append(function)
    return tuple(functions)


_default_runtime: Runtime | None = None
_default_lock = threading.Lock()


def default_runtime() -> Runtime:
    """The runtime configured by ``REGMW_CONFIG`` and the environment, built once per process.

    For background workers and scripts that are not WSGI apps but must share
    the servers' backends (the same Redis locks, say).
    """
    global _default_runtime
    with _default_lock:
        if _default_runtime is None:
            _default_runtime = build()
        return _default_runtime


def cluster_slot(name: str, max_holders: int, ttl: float = 30.0, runtime: Runtime | None = None):
    """``with cluster_slot("gc", max_holders=2) as lease:`` at most N holders across the fleet.

    Raises :class:`~regmw.errors.SlotUnavailable` when all slots are held;
    ``lease.lost`` is set if the slot could not be renewed (stop the work).
    """
    return (runtime or default_runtime()).services.locks.cluster_slot(name, max_holders, ttl)
