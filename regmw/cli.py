"""The ``regmw`` command line.

``regmw plugins``         which plugins are loaded and which hooks each implements
``regmw check-config F``  validate a configuration file (exit 2 with one line on error)
``regmw config-docs``     print the configuration reference (docs/configuration.md)
``regmw serve``           run regmw in front of a registry app or as a gateway
``regmw demo``            a working registry front on 127.0.0.1 with embedded defaults
``regmw readonly ...``    set, clear and list per-repository read-only locks
``regmw migrate-mark R``  record that repository R has been migrated (classification "new")
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import ConfigError

USAGE_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return USAGE_ERROR
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        print(f"regmw: configuration error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    config_help = "TOML configuration file (default: $REGMW_CONFIG, else defaults)"
    parser = argparse.ArgumentParser(prog="regmw", description="Pluggable WSGI middleware for container registries.")
    parser.add_argument("-c", "--config", help=config_help)
    # `regmw serve --config F` works as well as `regmw --config F serve`
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, help=config_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    cmd = sub.add_parser("plugins", parents=[common], help="list loaded plugins and the hooks each implements")
    cmd.set_defaults(func=cmd_plugins)

    cmd = sub.add_parser("check-config", parents=[common], help="validate a configuration file")
    cmd.add_argument("file")
    cmd.set_defaults(func=cmd_check_config)

    cmd = sub.add_parser("config-docs", parents=[common], help="print the configuration reference as Markdown")
    cmd.add_argument("--check", metavar="FILE", help="exit 1 if FILE differs from the generated reference")
    cmd.set_defaults(func=cmd_config_docs)

    cmd = sub.add_parser("serve", parents=[common], help="serve regmw in front of a registry (gateway, reference registry or --app)")
    cmd.add_argument("--host", default="127.0.0.1")
    cmd.add_argument("--port", type=int, default=5000)
    cmd.add_argument("--app", help="module:attribute of a WSGI registry app to wrap")
    cmd.add_argument("--registry-root", help="serve the bundled reference registry on this directory")
    cmd.set_defaults(func=cmd_serve)

    cmd = sub.add_parser("demo", parents=[common], help="run a registry front on 127.0.0.1 with every embedded default enabled")
    cmd.add_argument("--port", type=int, default=5000)
    cmd.add_argument("--root", help="registry storage directory (default: a new temporary directory)")
    cmd.add_argument("--self-test", action="store_true", help="push and pull a tiny image through it, print the decisions, exit")
    cmd.set_defaults(func=cmd_demo)

    cmd = sub.add_parser("readonly", parents=[common], help="per-repository read-only locks")
    ro = cmd.add_subparsers(dest="action", metavar="ACTION", required=True)
    act = ro.add_parser("set", parents=[common], help="make REPO read-only for --ttl seconds")
    act.add_argument("repository")
    act.add_argument("--ttl", type=float, default=3600.0)
    act.add_argument("--owner", help="lock owner (default: regmw-cli@<host>)")
    act = ro.add_parser("clear", parents=[common], help="clear REPO's read-only lock held by --owner (default: this CLI's owner)")
    act.add_argument("repository")
    act.add_argument("--owner", help="the owner that set the lock (default: regmw-cli@<host>)")
    act.add_argument("--force", action="store_true", help="clear it whoever holds it (operator override)")
    ro.add_parser("list", parents=[common], help="list read-only repositories and the seconds left")
    cmd.set_defaults(func=cmd_readonly)

    cmd = sub.add_parser("migrate-mark", parents=[common], help="record that REPO was migrated (classification becomes new)")
    cmd.add_argument("repository")
    cmd.set_defaults(func=cmd_migrate_mark)
    return parser


def _runtime(args):
    from .runtime import build

    return build(args.config)


def cmd_plugins(args) -> int:
    from .plugins import describe

    runtime = _runtime(args)
    for name, origin, hooks in describe(runtime.pm):
        print(f"{name}  ({origin})")
        for hook in hooks:
            print(f"    {hook}")
    return 0


def cmd_check_config(args) -> int:
    from .runtime import build

    runtime = build(args.file)
    enabled = ", ".join(runtime.config["regmw"]["plugins"]) or "embedded defaults only"
    print(f"{args.file}: ok ({enabled})")
    return 0


def cmd_config_docs(args) -> int:
    from .config import render_markdown
    from .plugins import BUILTIN_PLUGINS, load_plugins, make_manager
    from .runtime import gather_sections

    pm = make_manager()
    load_plugins(pm, BUILTIN_PLUGINS, entry_points=False)
    text = render_markdown(gather_sections(pm).values()) + "\n"
    if args.check:
        with open(args.check, encoding="utf-8") as handle:
            if handle.read() != text:
                print(f"{args.check} is out of date: run `regmw config-docs > {args.check}`", file=sys.stderr)
                return 1
        return 0
    sys.stdout.write(text)
    return 0


def cmd_readonly(args) -> int:
    import socket

    from .errors import Refusal
    from .routes import check_name

    from .defaults.local_locks import LocalLockManager

    locks = _runtime(args).services.locks
    if isinstance(locks, LocalLockManager):
        # A lock set here would live and die with this command's own process.
        print("regmw: readonly needs a shared lock store (enable the redis plugin); the embedded locks "
              "live inside each server process (use services.locks.set_read_only there)", file=sys.stderr)
        return USAGE_ERROR
    if args.action == "list":
        for repository, seconds in sorted(locks.list_read_only().items()):
            print(f"{repository}\t{seconds:.0f}s")
        return 0
    try:
        repository = check_name(args.repository)
    except Refusal as refusal:
        print(f"regmw: {refusal.message}: {args.repository!r}", file=sys.stderr)
        return USAGE_ERROR
    owner = args.owner or f"regmw-cli@{socket.gethostname()}"
    if args.action == "set":
        lease = locks.set_read_only(repository, args.ttl, owner)
        if lease is None:
            print(f"regmw: {repository} is already read-only under another owner", file=sys.stderr)
            return 1
        print(f"{repository} read-only for {args.ttl:.0f}s (owner {lease.owner}, token {lease.token})")
        return 0
    # Locks are released by their owner; --force is the operator's explicit override.
    if locks.clear_read_only(repository, None if args.force else owner):
        print(f"{repository} writable")
        return 0
    hint = "" if args.force else f" under owner {owner} (--force clears any owner's lock)"
    print(f"regmw: {repository} was not read-only{hint}", file=sys.stderr)
    return 1


def cmd_migrate_mark(args) -> int:
    from .errors import Refusal
    from .routes import check_name

    try:
        repository = check_name(args.repository)
    except Refusal as refusal:
        print(f"regmw: {refusal.message}: {args.repository!r}", file=sys.stderr)
        return USAGE_ERROR
    from .defaults.memory_cache import MemoryCache
    from .errors import BackendUnavailable

    runtime = _runtime(args)
    if isinstance(runtime.services.cache, MemoryCache):
        # The mark would land in this command's own process and vanish with it.
        print("regmw: migrate-mark needs a shared cache (enable the redis plugin); the embedded cache "
              "lives inside each server process", file=sys.stderr)
        return USAGE_ERROR
    classifier = runtime.services.classifier
    if classifier is None:
        print("regmw: migrate-mark needs the migration plugin ([regmw] plugins = [\"migration\"])", file=sys.stderr)
        return USAGE_ERROR
    try:
        classifier.mark_migrated(repository)
    except BackendUnavailable as exc:
        print(f"regmw: could not record the mark: {exc}", file=sys.stderr)
        return 1
    print(f"{repository} marked as migrated (new)")
    return 0


def cmd_serve(args) -> int:
    from .serve import serve

    return serve(args)


def cmd_demo(args) -> int:
    from .demo.run import demo

    return demo(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
