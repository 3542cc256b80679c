"""The plugin manager: embedded defaults, built-ins named in config, entry points.

Registration order decides precedence for ``firstresult`` hooks (pluggy calls
the most recently registered plugin first):

1. embedded defaults (:mod:`regmw.defaults`), always, so they answer last;
2. built-in plugins named in ``[regmw] plugins`` (``redis``, ``gcs``, ...);
3. third-party plugins from the ``regmw`` entry-point group;
4. plugin objects passed in code (``RegistryMiddleware(app, plugins=[...])``).
"""
from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Iterable, Mapping
from typing import Any

import pluggy

from . import hookspecs
from .config import _as_list
from .errors import ConfigError

hookimpl = pluggy.HookimplMarker("regmw")

ENTRY_POINT_GROUP = "regmw"

#: built-in plugins that configuration can enable, by name
BUILTIN_PLUGINS: dict[str, str] = {
    "migration": "regmw_migration",
    "gcs": "regmw_gcs",
    "redis": "regmw_redis",
    "dbroute": "regmw_dbroute",
    "notifications": "regmw_notify",
    "jobs": "regmw_jobs",
    "db-migrations": "regmw_batches",
}

#: the setup.cfg extra that installs each built-in's dependencies
BUILTIN_EXTRAS: dict[str, str] = {"gcs": "gcs", "redis": "redis", "dbroute": "db", "jobs": "jobs", "db-migrations": "db"}

DEFAULT_PLUGINS: tuple[str, ...] = (
    "regmw.defaults.core",
    "regmw.defaults.memory_cache",
    "regmw.defaults.local_locks",
    "regmw.defaults.readonly_cli",
    "regmw.defaults.ratelimit",
    "regmw.defaults.filesystem",
    "regmw.defaults.serve",
    "regmw.defaults.jobs",
    "regmw.defaults.jobs_cli",
    "regmw.defaults.purge",
    "regmw.gateway",
)


def make_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("regmw")
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    return pm


def load_plugins(
    pm: pluggy.PluginManager,
    builtins: Iterable[str] = (),
    extra: Iterable[Any] = (),
    entry_points: bool = True,
) -> None:
    """Register built-ins by name, then entry-point plugins, then ``extra`` objects."""
    for name in builtins:
        module_name = BUILTIN_PLUGINS.get(name, name if "." in name else None)
        if module_name is None:
            known = ", ".join(sorted(BUILTIN_PLUGINS))
            raise ConfigError(f"regmw.plugins: unknown plugin {name!r} (built-ins: {known}; or a dotted module path)")
        if pm.get_plugin(module_name) is not None:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            extra_name = BUILTIN_EXTRAS.get(name)
            hint = f"; install its extra: pip install 'regmw[{extra_name}]'" if extra_name else ""
            raise ConfigError(f"regmw.plugins: plugin {name!r} cannot be imported ({exc}){hint}") from None
        _register(pm, module, module_name)
    if entry_points:
        _load_entry_points(pm)
    for plugin in extra:
        if not pm.is_registered(plugin):
            _register(pm, plugin, None)
    try:
        pm.check_pending()  # a misspelled hook (regmw_admitt) would otherwise be silently never called
    except pluggy.PluginValidationError as exc:
        raise ConfigError(f"plugin {_origin(pm, exc.plugin)}: {_one_line(exc)}") from None


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register the ``regmw`` entry points one by one, so a broken one is named (entry point and distribution)."""
    for dist in list(importlib.metadata.distributions()):
        for entry in dist.entry_points:
            if entry.group != ENTRY_POINT_GROUP or pm.has_plugin(entry.name) or pm.is_blocked(entry.name):
                continue
            try:
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=entry.name)
            except Exception as exc:  # a broken third-party distribution: name it, do not crash with a traceback
                where = f"{entry.name} = {entry.value} ({dist.metadata['Name']} {dist.version})"
                raise ConfigError(f"entry point {where} failed to load: {type(exc).__name__}: "
                                  f"{_one_line(exc)}") from None


def _origin(pm: pluggy.PluginManager, plugin: Any) -> str:
    """A plugin as an error line names it: its registered name (and distribution), else its repr."""
    name = pm.get_name(plugin)
    for registered, dist in pm.list_plugin_distinfo():
        if registered is plugin:
            return f"{name} (entry point ({dist.project_name} {dist.version}))"
    return name if name and name != str(id(plugin)) else repr(plugin)


def _one_line(exc: BaseException) -> str:
    """An exception's text on one line (pluggy's validation errors span several)."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or repr(exc)


def _register(pm: pluggy.PluginManager, plugin: Any, name: str | None) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise ConfigError(f"plugin {name or plugin!r}: {_one_line(exc)}") from None


def describe(pm: pluggy.PluginManager) -> list[tuple[str, str, list[str]]]:
    """(name, where it came from, hooks it implements) for every registered plugin."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    rows = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked: [regmw] disable_plugins
            rows.append((name, "disabled ([regmw] disable_plugins)", []))
            continue
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or ())
        if name in DEFAULT_PLUGINS:
            origin = "embedded default"
        elif name in BUILTIN_PLUGINS.values():
            origin = "built-in"
        elif id(plugin) in dists:
            dist = dists[id(plugin)]
            origin = f"entry point ({dist.project_name} {dist.version})"
        else:
            origin = "registered in code"
        rows.append((name, origin, hooks))
    return rows


def manager_for(
    raw: Mapping[str, Any], environ: Mapping[str, str], extra: Iterable[Any] = (), source: str = "<config>"
) -> pluggy.PluginManager:
    """The plugin manager a configuration asks for: defaults, ``[regmw] plugins``, entry points, ``extra``.

    Reads only ``[regmw] plugins`` and ``entry_points`` (the environment's
    ``REGMW_PLUGINS``/``REGMW_ENTRY_POINTS`` win, as everywhere); validating
    the rest needs the sections these plugins declare.
    """
    core = raw.get("regmw", {}) if isinstance(raw.get("regmw", {}), Mapping) else {}
    lists = {}
    for key in ("plugins", "disable_plugins"):
        try:
            lists[key] = _as_list(environ.get(f"REGMW_{key.upper()}", core.get(key, [])), None)
        except ValueError as exc:
            raise ConfigError(f"{source}: regmw.{key}: {exc}") from None
    entry_points = str(environ.get("REGMW_ENTRY_POINTS", core.get("entry_points", True))).lower()
    pm = make_manager()
    block_entry_points(pm, lists["disable_plugins"], source)
    load_plugins(pm, lists["plugins"], extra, entry_points not in ("false", "0", "no", "off"))
    return pm


def block_entry_points(pm: pluggy.PluginManager, names: Iterable[str], source: str = "<config>") -> None:
    """Keep the named entry-point plugins from loading (``[regmw] disable_plugins``; pytest's ``-p no:NAME``).

    Only entry-point names: a built-in is switched off by leaving it out of
    ``[regmw] plugins``, and an embedded default holds sections and services
    the core needs, so naming either is a configuration error rather than a
    silent no-op (or a core missing its defaults). A name no installed
    distribution declares is accepted: one file serves hosts with and
    without that plugin installed.
    """
    for name in names:
        if name in BUILTIN_PLUGINS or name in BUILTIN_PLUGINS.values() or name in DEFAULT_PLUGINS:
            raise ConfigError(f"{source}: regmw.disable_plugins: {name!r} is not an entry-point plugin (a built-in is "
                              "disabled by leaving it out of regmw.plugins; embedded defaults cannot be disabled)")
        pm.set_blocked(name)

