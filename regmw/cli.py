"""The ``regmw`` command line (click, which Flask already ships).

``regmw plugins``                which plugins are loaded and which hooks each implements
``regmw check-config F``         validate a configuration file, building nothing (exit 2 with one line on error);
                                 ``--connect`` runs the whole start-up, connections included
``regmw config-docs``            print the configuration reference (docs/configuration.md)
``regmw serve``                  run regmw in front of a registry app or as a gateway
``regmw demo``                   a working registry front on 127.0.0.1 with embedded defaults

Plugins add their own commands through the ``regmw_cli_commands`` hook: the
embedded lock plugin adds ``regmw readonly set|clear|list``, the ``migration``
plugin ``regmw migrate-mark``. A plugin's commands appear when the plugin is
loaded by the configuration (``--config``/``-c``, before or after the command,
else ``$REGMW_CONFIG``). The core imports no plugin: it asks the hook.

Plugin commands use the helpers here: :func:`config_option` (accept ``-c``
after the command too), :func:`get_runtime` (the configured runtime, built
once per invocation) and :class:`Failure` (one line on stderr, an exit code).
"""
from __future__ import annotations

import math
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import click

from .errors import ConfigError, exception_line

USAGE_ERROR = 2
FAILED = 1
INTERRUPTED = 130
_CONFIG_HELP = "TOML configuration file (default: $REGMW_CONFIG, else defaults)"


class Failure(click.ClickException):
    """A command's refusal: ``regmw: <message>`` on stderr and ``exit_code`` (2 = misuse, 1 = did not happen)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"regmw: {self.message}", err=True)


class FiniteFloatRange(click.FloatRange):
    """A :class:`click.FloatRange` that also refuses ``nan`` and ``inf`` (exit 2, like any bad option value)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


#: a TCP port on the command line (0: any free port)
PORT = click.IntRange(0, 65535)


class _State:
    """What one invocation shares between the group and its commands: the config path and, once built, the runtime."""

    def __init__(self) -> None:
        self.config: str | None = None
        self.runtime: Any = None
        self.plugin_commands: dict[str, click.Command] | None = None


def _remember_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        ctx.ensure_object(_State).config = value
    return value


def config_option(command: Callable) -> Callable:
    """``-c/--config FILE`` on a command, so it may follow the command name (``regmw readonly list -c F``)."""
    return click.option(
        "-c", "--config", help=_CONFIG_HELP, expose_value=False, is_eager=True, callback=_remember_config
    )(command)


def get_runtime(ctx: click.Context | None = None) -> Any:
    """The :class:`~regmw.runtime.Runtime` of the configuration this invocation names, built once."""
    from .runtime import build

    state = (ctx or click.get_current_context()).ensure_object(_State)
    if state.runtime is None:
        state.runtime = build(state.config)
    return state.runtime


def _config_in(args: Sequence[str]) -> str | None:
    """The value of a ``-c``/``--config`` that follows the command name (read early: it decides which plugins load)."""
    for index, arg in enumerate(args):
        if arg == "--":
            break
        if arg in ("-c", "--config") and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--config="):
            return arg.partition("=")[2]
        if arg.startswith("-c") and len(arg) > 2 and not arg.startswith("--"):
            return arg[2:]
    return None


class RegmwGroup(click.Group):
    """The core commands plus those the loaded plugins contribute through ``regmw_cli_commands``."""

    def _plugin_commands(self, ctx: click.Context) -> dict[str, click.Command]:
        state = ctx.ensure_object(_State)
        found = state.plugin_commands
        if found is None:
            pm = load_manager(state.config)
            found = {}
            for commands in reversed(pm.hook.regmw_cli_commands()):  # pluggy calls the latest plugin first
                for command in commands or ():
                    found[command.name] = command
            state.plugin_commands = found
        return found

    def resolve_command(self, ctx: click.Context, args: list[str]):
        state = ctx.ensure_object(_State)
        if state.config is None:
            state.config = _config_in(args[1:])
        if args and not args[0].startswith("-") and self.get_command(ctx, args[0]) is None:
            ctx.fail(f"no such command {args[0]!r} (a plugin's commands appear when the configuration enables it)")
        return super().resolve_command(ctx, args)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return super().get_command(ctx, name) or self._plugin_commands(ctx).get(name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._plugin_commands(ctx)})


def load_manager(config: str | None, environ: Mapping[str, str] | None = None):
    """The plugin manager ``regmw`` would build for ``config`` (reads only which plugins it enables)."""
    from .config import load_toml
    from .plugins import manager_for

    environ = os.environ if environ is None else environ
    path = config or environ.get("REGMW_CONFIG")
    return manager_for(load_toml(path) if path else {}, environ, source=str(path or "<defaults>"))


def validate_file(path: str | None, environ: Mapping[str, str] | None = None):
    """Validate ``path`` (None: the defaults) exactly as start-up does (schema, cross-field checks), building no backend.

    Returns the validated :class:`~regmw.config.Config`. Nothing is connected
    to: the schema's checks read only the file and the environment.
    """
    from .config import env_overrides, load_toml, merge, validate
    from .runtime import gather_sections

    environ = os.environ if environ is None else environ
    raw = load_toml(path) if path else {}
    pm = load_manager(path, {**environ, "REGMW_CONFIG": ""} if not path else environ)
    sections = gather_sections(pm)
    return validate(merge(raw, env_overrides(sections, environ)), sections, str(path or "<defaults>"))


@click.group(cls=RegmwGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", help=_CONFIG_HELP, expose_value=False, is_eager=True, callback=_remember_config)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Pluggable WSGI middleware for container registries."""
    ctx.ensure_object(_State)


@cli.command("plugins")
@config_option
def plugins_command() -> None:
    """List loaded plugins and the hooks each implements.

    The configuration is validated as start-up does, but nothing is built:
    no provider hook or ``regmw_startup`` runs, no connection is opened.
    """
    from .plugins import describe

    state = click.get_current_context().ensure_object(_State)
    validate_file(state.config or os.environ.get("REGMW_CONFIG"))
    for name, origin, hooks in describe(load_manager(state.config)):
        click.echo(f"{name}  ({origin})")
        for hook in hooks:
            click.echo(f"    {hook}")


@cli.command("check-config")
@click.argument("file")
@click.option("--connect", is_flag=True, help="Also run the whole start-up: build every backend and connect to it.")
@config_option
def check_config_command(file: str, connect: bool) -> None:
    """Validate a configuration file; refuses exactly what start-up refuses.

    Without --connect nothing is built and no connection is opened (the
    schema's rules read only the file and the environment).
    """
    if connect:
        from .runtime import build

        runtime = build(file)
        redis = getattr(runtime.services, "redis", None)  # the shared connection of the plugin contract
        if redis is not None:
            try:
                redis.ping()
            except Exception as exc:  # noqa: BLE001 - whatever the client raised, report it in one line
                raise Failure(f"{file}: redis: cannot connect: {str(exc).splitlines()[0] if str(exc) else repr(exc)}") from None
        config = runtime.config
    else:
        config = validate_file(file)
    from .plugins import describe

    pm = runtime.pm if connect else load_manager(file)
    third_party = [f"{name} (entry point)" for name, origin, _ in describe(pm) if origin.startswith("entry point")]
    enabled = ", ".join([*config["regmw"]["plugins"], *third_party]) or "embedded defaults only"
    click.echo(f"{file}: ok ({enabled}){'; start-up ran' if connect else ''}")


@cli.command("config-docs")
@click.option("--check", metavar="FILE",
              help="Exit 1 if FILE differs from regmw's own reference (as --builtin-only prints it).")
@click.option("--builtin-only", is_flag=True,
              help="Only regmw's sections and its built-in plugins' (docs/configuration.md), no third-party plugin's.")
@config_option
def config_docs_command(check: str | None, builtin_only: bool) -> None:
    """Print the configuration reference as Markdown.

    Every section of regmw and of its built-in plugins, enabled or not, then
    those of the third-party plugins the configuration loads (entry points,
    dotted module paths in ``[regmw] plugins``). A built-in whose extra is not
    installed is left out with a note on stderr (``--check`` and
    ``--builtin-only``, regmw's whole reference, refuse instead).
    """
    from .config import render_markdown
    from .plugins import BUILTIN_PLUGINS, load_plugins, make_manager
    from .runtime import gather_sections

    pm = make_manager()
    for name in BUILTIN_PLUGINS:
        try:
            load_plugins(pm, [name], entry_points=False)
        except ConfigError as exc:
            if check or builtin_only:
                raise
            click.echo(f"regmw: note: left out of this reference: {exc}", err=True)
    sections = gather_sections(pm)
    extra = []
    if not (check or builtin_only):
        state = click.get_current_context().ensure_object(_State)
        loaded = gather_sections(load_manager(state.config))
        extra = [section for name, section in loaded.items() if name not in sections]
    text = render_markdown(sections.values(), extra) + "\n"
    if check:
        with open(check, encoding="utf-8") as handle:
            if handle.read() != text:
                raise Failure(f"{check} is out of date: run `regmw config-docs > {check}`", 1)
        return
    click.echo(text, nl=False)


class _Args:
    """The attribute bag :func:`regmw.serve.serve` and :func:`regmw.demo.run.demo` read."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


def _not_empty(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value.strip():
        raise click.BadParameter("must not be empty", ctx, param)
    return value


@cli.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, callback=_not_empty)
@click.option("--port", type=PORT, default=5000, show_default=True)
@click.option("--app", help="module:attribute of a WSGI registry app to wrap")
@click.option("--registry-root", help="serve the bundled reference registry on this directory")
@config_option
def serve_command(host: str, port: int, app: str | None, registry_root: str | None) -> None:
    """Serve regmw in front of a registry (gateway, reference registry or --app)."""
    from .serve import serve
    from .server import ListenError

    ctx = click.get_current_context()
    try:
        code = serve(_Args(config=ctx.ensure_object(_State).config, host=host, port=port, app=app,
                           registry_root=registry_root))
    except ListenError as exc:
        raise Failure(str(exc), 1) from None
    ctx.exit(code or 0)


@cli.command("demo")
@click.option("--port", type=PORT, default=5000, show_default=True, help="0: any free port")
@click.option("--root", help="registry storage directory (default: a new temporary directory)")
@click.option("--self-test", is_flag=True, help="push and pull a tiny image through it, print the decisions, exit")
@config_option
def demo_command(port: int, root: str | None, self_test: bool) -> None:
    """Run a registry front on 127.0.0.1 with every embedded default enabled.

    With ``-c FILE``, the file's sections are laid over the demo's own
    configuration (key by key): try a rate limit or a plugin on the demo.
    """
    from .demo.run import demo

    ctx = click.get_current_context()
    ctx.exit(demo(_Args(config=ctx.ensure_object(_State).config, port=port, root=root, self_test=self_test)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return its exit code.

    Every error is one line on stderr, never a traceback: configuration and
    usage errors exit 2, a command that did not happen (a refusal, Redis,
    the database or storage unreachable, any other error) exits 1, an
    interrupt (Ctrl-C) 130. ``REGMW_TRACEBACK=1`` adds the traceback of an
    unexpected error.
    """
    try:
        result = cli.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="regmw", standalone_mode=False)
    except ConfigError as exc:
        click.echo(f"regmw: configuration error: {exc}", err=True)
        return USAGE_ERROR
    except click.UsageError as exc:  # one line too, naming where the help is (click's own block spans four)
        where = exc.ctx.command_path if exc.ctx is not None else "regmw"
        click.echo(f"regmw: {exc.format_message()} (see '{where} --help')", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        return INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a dependency down, a bug: one line, not a traceback
        if os.environ.get("REGMW_TRACEBACK"):
            traceback.print_exc()
        click.echo(f"regmw: {exception_line(exc)}", err=True)
        return FAILED
    return result if isinstance(result, int) else 0  # ctx.exit(code) returns the code here


if __name__ == "__main__":  # pragma: no cover
    # ``python -m regmw.cli`` runs this file as ``__main__``; plugin commands
    # import ``regmw.cli`` (get_runtime, config_option), a second copy of the
    # module. Run that copy's main so both see the same -c/--config.
    from regmw.cli import main as _main

    sys.exit(_main())
