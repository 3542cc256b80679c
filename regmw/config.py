"""Configuration: one TOML file, environment overrides, Flask ``app.config``.

Each section is declared by whoever owns it (the core, or a plugin through the
``regmw_config_sections`` hook) as a :class:`Section` of :class:`Option`.
Validation happens once, at start-up: an unknown section or key, a value of the
wrong type, a bad URL, a missing required option or a combination of options
that cannot work together raises :class:`ConfigError` with one line naming
``section.key``. Cross-field rules live here too, as a section's ``checks``,
so that ``regmw check-config`` (which validates without building anything)
refuses exactly what start-up refuses. The same schema generates
``docs/configuration.md`` (``regmw config-docs``), so the docs cannot drift.

Environment overrides are ``REGMW_<SECTION>_<KEY>`` (``REGMW_REDIS_URL`` sets
``[redis] url``; the core's ``[regmw]`` keys are ``REGMW_<KEY>``, e.g.
``REGMW_PLUGINS``); Flask apps may use the same names as ``app.config`` keys.
"""
from __future__ import annotations

import ipaddress
import json
import math
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError, exception_line

_MISSING = object()


@dataclass(frozen=True)
class Option:
    """One configuration key: its type, default and the sentence the docs print."""

    type: str  # str, int, float, bool, list, url, path, cidrs, table-list, table
    default: Any = None
    help: str = ""
    required: bool = False
    choices: tuple[str, ...] | None = None
    schemes: tuple[str, ...] | None = None  # for type "url"
    minimum: float | None = None
    maximum: float | None = None
    check: Callable[[Any], Any] | None = None  # extra validation, raises ValueError


#: a cross-field rule: (this section's validated values, the whole validated config) -> an error, or None
Check = Callable[[Mapping[str, Any], "Config"], "str | None"]


@dataclass(frozen=True)
class Section:
    """A named group of options, e.g. ``[redis]``.

    ``checks`` are the section's cross-field rules, run once every section has
    its validated values (so a rule may read another section, e.g. ``[redis]
    hot_path`` against ``[ratelimit] strategy``). Each returns one sentence
    naming the keys involved, or None; they must not open files on the
    network or connect anywhere (``check-config`` runs them without
    ``--connect``).
    """

    name: str
    help: str
    options: Mapping[str, Option] = field(default_factory=dict)
    owner: str = "regmw"
    checks: tuple[Check, ...] = ()


class Config(Mapping[str, Mapping[str, Any]]):
    """Validated configuration: ``config["redis"]["url"]``; defaults filled in."""

    def __init__(self, values: dict[str, dict[str, Any]], sections: Mapping[str, Section], source: str):
        self._values = values
        self.sections = dict(sections)
        self.source = source

    def __getitem__(self, name: str) -> Mapping[str, Any]:
        return self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dict(values) for name, values in self._values.items()}


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML file; a syntax error becomes a one-line ConfigError."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8; tomllib lets the decoding error through
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 (byte {exc.start})") from None


def env_overrides(
    sections: Mapping[str, Section], environ: Mapping[str, str], prefix: str = "REGMW_"
) -> dict[str, dict[str, Any]]:
    """Collect ``REGMW_<SECTION>_<KEY>`` values (strings, parsed later by type)."""
    found: dict[str, dict[str, Any]] = {}
    for section in sections.values():
        for key in section.options:
            name = env_name(section.name, key, prefix)
            if name in environ:
                found.setdefault(section.name, {})[key] = _FromEnvironment(environ[name], name)
    return found


class _FromEnvironment(str):
    """A value set by ``REGMW_<SECTION>_<KEY>``: remembers the variable, so an error line names it, not the file."""

    variable: str

    def __new__(cls, value: str, variable: str) -> _FromEnvironment:
        self = super().__new__(cls, value)
        self.variable = variable
        return self


def env_name(section: str, key: str, prefix: str = "REGMW_") -> str:
    """``REGMW_REDIS_URL`` for ``[redis] url``; the core's own ``[regmw]`` keys drop the section."""
    middle = "" if section == "regmw" else f"{section}_"
    return f"{prefix}{middle}{key}".upper().replace("-", "_")


def merge(base: dict[str, Any], *overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    merged = {name: dict(values) if isinstance(values, dict) else values for name, values in base.items()}
    for override in overrides:
        for name, values in override.items():
            target = merged.setdefault(name, {})
            if isinstance(target, dict):
                target.update(values)
    return merged


def validate(raw: Mapping[str, Any], sections: Mapping[str, Section], source: str = "<config>") -> Config:
    """Check every section and key against the schema and fill in defaults."""
    values: dict[str, dict[str, Any]] = {}
    for name, given in raw.items():
        if name not in sections:
            known = ", ".join(sorted(sections))
            raise ConfigError(f"{source}: unknown section [{name}] (known: {known}; is its plugin enabled?)")
        if not isinstance(given, Mapping):
            raise ConfigError(f"{source}: [{name}] must be a table")
        for key in given:
            if key not in sections[name].options:
                known = ", ".join(sorted(sections[name].options))
                raise ConfigError(f"{source}: unknown key {name}.{key} (known: {known})")
    for name, section in sections.items():
        given = raw.get(name, {})
        out: dict[str, Any] = {}
        for key, option in section.options.items():
            where = f"{name}.{key}"
            if key in given:
                out[key] = _coerce(option, given[key], where, source)
            elif option.required:
                raise ConfigError(f"{source}: missing required option {where}")
            else:
                out[key] = option.default
        values[name] = out
    validated = Config(values, sections, source)
    for name, section in sections.items():
        for check in section.checks:
            try:
                problem = check(values[name], validated)
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - a rule's bug: name the section and the rule, in one line
                raise ConfigError(f"{source}: [{name}] rule {getattr(check, '__name__', repr(check))} failed: "
                                  f"{exception_line(exc)}") from None
            if problem:
                raise ConfigError(f"{source}: {problem}")
    return validated


def _coerce(option: Option, value: Any, where: str, source: str) -> Any:
    if isinstance(value, _FromEnvironment):
        where, value = f"{where} (from {value.variable})", str(value)
    try:
        result = _COERCE[option.type](value, option)
        if option.choices is not None and result not in option.choices:
            raise ValueError(f"must be one of {', '.join(option.choices)}")
        if option.minimum is not None and result < option.minimum:
            raise ValueError(f"must be at least {option.minimum}")
        if option.maximum is not None and result > option.maximum:
            raise ValueError(f"must be at most {option.maximum}")
        if option.check is not None:
            checked = option.check(result)  # the value, possibly normalised (None: unchanged)
            result = result if checked is None else checked
        return result
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {where}: {exc} (got {value!r})") from None


def _as_bool(value: Any, option: Option) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _as_int(value: Any, option: Option) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("must be a whole number")
    try:
        return int(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError("must be a whole number") from None


def _as_float(value: Any, option: Option) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    try:
        result = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError("must be a number") from None
    if not math.isfinite(result):
        raise ValueError("must be a finite number")
    return result


def _as_str(value: Any, option: Option) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _as_list(value: Any, option: Option) -> list[str]:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ValueError("must be a list of strings")


def _as_url(value: Any, option: Option) -> str:
    text = _as_str(value, option)
    parts = urlsplit(text)
    if not parts.scheme or (option.schemes and parts.scheme not in option.schemes):
        allowed = ", ".join(f"{scheme}://" for scheme in option.schemes or ())
        raise ValueError(f"not a URL with a known scheme ({allowed})")
    if parts.scheme != "unix" and not parts.netloc:
        raise ValueError("URL has no host")
    for address in parts.netloc.rpartition("@")[2].split(","):  # sentinel URLs list several hosts
        _, colon, port = address.rpartition(":")
        if colon and not address.endswith("]") and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"port {port!r} out of range")
    return text


def _as_cidrs(value: Any, option: Option) -> list[ipaddress._BaseNetwork]:
    return [ipaddress.ip_network(item, strict=False) for item in _as_list(value, option)]


def _json(value: str, kind: str) -> Any:
    """A table (list) given as text (an environment variable): JSON, or an error saying what was expected."""
    try:
        return json.loads(value)
    except ValueError as exc:  # e.g. rules = "100/minute": json's "Extra data: line 1 column 4" alone names nothing
        raise ValueError(f"must be {kind} (as JSON when given as a string: {exc})") from None


def _as_tables(value: Any, option: Option) -> list[dict[str, Any]]:
    if isinstance(value, str):
        value = _json(value, "a list of tables")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ValueError("must be a list of tables")
    return [dict(item) for item in value]


def _as_table(value: Any, option: Option) -> dict[str, Any]:
    if isinstance(value, str):
        value = _json(value, "a table")
    if not isinstance(value, dict):
        raise ValueError("must be a table")
    return dict(value)


_COERCE: dict[str, Callable[[Any, Option], Any]] = {
    "str": _as_str,
    "path": _as_str,
    "int": _as_int,
    "float": _as_float,
    "bool": _as_bool,
    "list": _as_list,
    "url": _as_url,
    "cidrs": _as_cidrs,
    "table-list": _as_tables,
    "table": _as_table,
}

#: the ``Option`` types (``regmw_config_sections`` declaring another is refused at start-up)
OPTION_TYPES: tuple[str, ...] = tuple(_COERCE)


def render_markdown(sections: Iterable[Section], extra: Iterable[Section] = ()) -> str:
    """The configuration reference, generated from the schema (docs/configuration.md).

    ``extra``: third-party plugins' sections, listed after regmw's own.
    """
    lines = [
        "# Configuration reference",
        "",
        "Generated by `regmw config-docs` from the code's own schema; do not edit by hand.",
        "",
        "regmw reads one TOML file (`regmw --config FILE serve`; else `REGMW_CONFIG`, for the",
        "WSGI entry point `regmw.wsgi:application`, `RegistryMiddleware(app)` and a Flask app",
        "whose `app.config` names no `REGMW_CONFIG`). Every key can be overridden by an",
        "environment variable `REGMW_<SECTION>_<KEY>` (for example `REGMW_REDIS_URL`; the",
        "`[regmw]` section's keys drop the section name: `REGMW_PLUGINS`), and a",
        "Flask app may set the same names, or `REGMW = {section: {key: value}}`, in `app.config`",
        "(configuration laid over the file; the environment still wins). Lists may be given as",
        "comma-separated strings in the environment; lists of tables as JSON. An unknown",
        "section or key, a bad value or a missing required option stops start-up with one",
        "line naming it, and so does a combination of options that cannot work together",
        "(each section's rules are listed under its table). `regmw check-config FILE` runs",
        "exactly these checks without building or connecting to anything.",
        "",
    ]
    ordered = sorted(sections, key=lambda s: (s.owner != "regmw", s.name)) + sorted(extra, key=lambda s: s.name)
    for section in ordered:
        lines += [f"## [{section.name}]", "", f"{section.help} (from `{section.owner}`)", ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, option in section.options.items():
            default = "required" if option.required else f"`{json.dumps(_printable(option.default))}`"
            meaning = option.help.replace("|", "\\|")
            if option.choices:
                meaning += f" One of: {', '.join(option.choices)}."
            lines.append(f"| `{key}` | {option.type} | {default} | {meaning} |")
        lines.append("")
        rules = [" ".join((check.__doc__ or check.__name__).split()) for check in section.checks]
        if rules:
            lines += ["Checked together (start-up and `regmw check-config` refuse a configuration breaking one):", ""]
            lines += [f"- {rule}" for rule in rules] + [""]
    return "\n".join(lines)


def _printable(value: Any) -> Any:
    if isinstance(value, list):
        return [str(item) if not isinstance(item, (dict, str, int, float)) else item for item in value]
    return value
