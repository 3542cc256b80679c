"""The click command line: core commands, commands contributed by plugins, shared-store refusals."""
import importlib
import json
import socket
import subprocess
import sys
import textwrap

import pytest

from regmw.cli import main
from tests.test_plugins import install

SHARED_LOCKS = """
    import itertools, time
    from regmw import hookimpl
    from regmw.backends import Lease

    HELD = {}  # stands for a store every process sees (the test's "Redis")
    TOKENS = itertools.count(1)

    class SharedLocks:
        shared = True

        def read_only(self, repository):
            return repository in HELD and HELD[repository][2] > time.monotonic()

        def set_read_only(self, repository, ttl, owner=None):
            if self.read_only(repository) and HELD[repository][0] != owner:
                return None
            HELD[repository] = (owner, next(TOKENS), time.monotonic() + ttl)
            return Lease(repository, owner, HELD[repository][1], ttl)

        def clear_read_only(self, repository, owner=None):
            if repository not in HELD or (owner is not None and HELD[repository][0] != owner):
                return False
            del HELD[repository]
            return True

        def list_read_only(self):
            now = time.monotonic()
            return {repo: expires - now for repo, (_, _, expires) in HELD.items() if expires > now}

        def cluster_slot(self, name, max_holders, ttl=30.0):
            raise NotImplementedError

    @hookimpl
    def regmw_lock_manager(config):
        return SharedLocks()

    EVENTS = []  # stands for the notifications plugin's durable sink

    class RecordingSink:
        def emit(self, event):
            EVENTS.append(event)

    @hookimpl
    def regmw_event_sink(config, services):
        return RecordingSink()
"""


@pytest.fixture
def shared_locks_plugin(tmp_path, monkeypatch):
    """A third-party lock manager declaring `shared = True`, enabled by its dotted module name."""
    (tmp_path / "cli_plugins").mkdir()
    (tmp_path / "cli_plugins" / "__init__.py").write_text("")
    (tmp_path / "cli_plugins" / "shared_locks.py").write_text(textwrap.dedent(SHARED_LOCKS))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    config = tmp_path / "c.toml"
    config.write_text('[regmw]\nplugins = ["cli_plugins.shared_locks"]\n')
    yield str(config), importlib.import_module("cli_plugins.shared_locks")
    sys.modules.pop("cli_plugins.shared_locks", None)
    sys.modules.pop("cli_plugins", None)


def test_readonly_works_on_any_shared_lock_manager(shared_locks_plugin, capsys):
    config, store = shared_locks_plugin
    assert main(["-c", config, "readonly", "set", "team/app", "--ttl", "60", "--owner", "migrator-7"]) == 0
    assert capsys.readouterr().out.startswith("team/app read-only for 60s (owner migrator-7, token 1)")
    assert store.HELD["team/app"][0] == "migrator-7"
    assert main(["readonly", "set", "team/app", "-c", config]) == 1  # another owner holds it
    assert capsys.readouterr().err == "regmw: team/app is already read-only under another owner\n"
    assert main(["readonly", "list", "--config", config]) == 0
    assert capsys.readouterr().out.startswith("team/app\t")
    assert main(["readonly", "clear", "team/app", f"--config={config}"]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["-c", config, "readonly", "clear", "team/app", "--force"]) == 0
    assert store.HELD == {}
    # each change announced through services.events; the refused attempts announced nothing
    assert [(e["action"], e["target"]["repository"], e["actor"]["name"]) for e in store.EVENTS] == [
        ("locked", "team/app", "migrator-7"), ("unlocked", "team/app", "regmw-cli@" + socket.gethostname())]


def test_readonly_refuses_a_lock_manager_that_is_not_shared(capsys):
    assert main(["readonly", "set", "group/app"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shared lock store" in err and "LocalLockManager" in err
    assert main(["readonly", "set", "Bad..Name"]) == 2
    assert "'Bad..Name'" in capsys.readouterr().err


def test_migrate_mark_exists_only_when_the_migration_plugin_is_enabled(tmp_path, capsys):
    assert main(["migrate-mark", "group/app"]) == 2
    assert "no such command 'migrate-mark'" in capsys.readouterr().err
    config = tmp_path / "c.toml"
    config.write_text('[regmw]\nplugins = ["migration"]\n[migration]\nnew_root = "gitlab/v2"\n')
    assert main(["migrate-mark", "group/app", "-c", str(config)]) == 2  # found: -c after the command counts
    assert "shared cache" in capsys.readouterr().err
    assert main(["-c", str(config), "migrate-mark", "../etc"]) == 2
    assert "'../etc'" in capsys.readouterr().err


def test_a_third_party_plugin_contributes_a_command(tmp_path, monkeypatch, capsys):
    install(tmp_path, monkeypatch, "regmw_greet", """
        import click
        from regmw import hookimpl
        from regmw.cli import config_option, get_runtime

        @click.command("greet")
        @click.argument("name")
        @config_option
        def greet(name):
            \"\"\"Say hello, with the configured cache size.\"\"\"
            click.echo(f"hello {name} ({get_runtime().config['cache']['max_entries']})")

        @hookimpl
        def regmw_cli_commands():
            return [greet]
    """, project="regmw-greet", entry="greet")
    config = tmp_path / "c.toml"
    config.write_text("[cache]\nmax_entries = 42\n")
    try:
        assert main(["greet", "world", "-c", str(config)]) == 0
        assert capsys.readouterr().out == "hello world (42)\n"
        assert main(["--help"]) == 0
        assert "greet" in capsys.readouterr().out
        config.write_text("[regmw]\nentry_points = false\n")
        assert main(["-c", str(config), "greet", "world"]) == 2  # the plugin is not loaded: no command
    finally:
        sys.modules.pop("regmw_greet", None)


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert "Commands:" in captured.out + captured.err


def test_the_core_cli_imports_no_plugin():
    code = "import sys, regmw.cli; print(sorted(m for m in sys.modules if m.startswith('regmw_')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_migrate_mark_through_redis_changes_what_servers_decide(tmp_path, redis_server, capsys):
    from werkzeug.test import Client

    from regmw import RegistryMiddleware

    _, url = redis_server
    (tmp_path / "old/repositories/group/app/_layers").mkdir(parents=True)  # an own entry: group/app is old
    (tmp_path / "old/repositories/group/app/_layers/x").write_text("x")
    config = tmp_path / "c.toml"
    config.write_text(f'[regmw]\nplugins = ["migration", "redis"]\n[redis]\nurl = "{url}"\n'
                      f'[storage]\nroot = "{tmp_path}"\n[migration]\nold_root = "old"\nnew_root = "new"\n')

    def app(environ, start_response):
        start_response("200 OK", [])
        return [b""]

    server = Client(RegistryMiddleware(app, str(config), environ={}))
    assert server.get("/v2/group/app/tags/list").headers["Regmw-Migration-Path"] == "old"
    assert main(["-c", str(config), "migrate-mark", "group/app"]) == 0
    assert "marked as migrated" in capsys.readouterr().out
    assert server.get("/v2/group/app/tags/list").headers["Regmw-Migration-Path"] == "new"


def test_readonly_clear_releases_only_its_own_lock_unless_forced(tmp_path, redis_server, capsys):
    _, url = redis_server
    config = tmp_path / "c.toml"
    config.write_text(f'[regmw]\nplugins = ["redis"]\n[redis]\nurl = "{url}"\n')
    assert main(["-c", str(config), "readonly", "set", "team/app", "--owner", "migrator-7"]) == 0
    assert main(["-c", str(config), "readonly", "clear", "team/app"]) == 1  # held by migrator-7, not by the CLI
    assert "--force" in capsys.readouterr().err
    assert main(["-c", str(config), "readonly", "list"]) == 0
    assert capsys.readouterr().out.startswith("team/app\t")
    assert main(["-c", str(config), "readonly", "clear", "team/app", "--owner", "migrator-7"]) == 0
    assert main(["-c", str(config), "readonly", "set", "team/app", "--owner", "migrator-8"]) == 0
    assert main(["-c", str(config), "readonly", "clear", "team/app", "--force"]) == 0
    capsys.readouterr()
    assert main(["-c", str(config), "readonly", "list"]) == 0
    assert capsys.readouterr().out == ""


def test_config_option_goes_before_or_after_the_command(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("[cache]\nmax_entrys = 1\n")
    for argv in (["--config", str(config), "plugins"], ["plugins", "--config", str(config)],
                 ["readonly", "list", "-c", str(config)]):
        assert main(argv) == 2
        assert "cache.max_entrys" in capsys.readouterr().err


def test_cluster_slot_function_uses_the_configured_fleet_store(tmp_path, redis_server, monkeypatch):
    import regmw
    from regmw import SlotUnavailable, cluster_slot

    _, url = redis_server
    config = tmp_path / "c.toml"
    config.write_text(f'[regmw]\nplugins = ["redis"]\n[redis]\nurl = "{url}"\n')
    monkeypatch.setenv("REGMW_CONFIG", str(config))
    monkeypatch.setattr(regmw.runtime, "_default_runtime", None)
    other_process = regmw.build(str(config))  # a second instance of the fleet, same Redis
    with cluster_slot("gc", max_holders=2) as first:
        with cluster_slot("gc", max_holders=2, runtime=other_process) as second:
            assert first.token != second.token
            with pytest.raises(SlotUnavailable):
                with cluster_slot("gc", max_holders=2, runtime=other_process):
                    pass
    with cluster_slot("gc", max_holders=2, runtime=other_process):
        pass  # released: free again



def test_python_dash_m_plugin_commands_see_the_config(tmp_path, redis_server):
    """``python -m regmw.cli``: a plugin command (readonly) reads the -c file, not the defaults.

    Run as ``__main__`` the CLI module exists twice; a plugin command importing
    ``regmw.cli`` would see an empty state and build the in-process defaults
    (which ``readonly`` refuses).
    """
    _, url = redis_server
    config = tmp_path / "c.toml"
    config.write_text(f'[regmw]\nplugins = ["redis"]\n[redis]\nurl = "{url}"\nnamespace = "dash-m-{tmp_path.name}"\n')
    result = subprocess.run([sys.executable, "-m", "regmw.cli", "-c", str(config), "readonly", "list"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "in-process" not in result.stderr


def _down_redis_config(tmp_path) -> str:
    from tests.servers._util import free_port

    config = tmp_path / "down.toml"  # nothing listens there: Redis is down
    config.write_text(f'[regmw]\nplugins = ["redis", "migration", "jobs"]\n[migration]\nnew_root = "new"\n'
                      f'[redis]\nurl = "redis://127.0.0.1:{free_port()}/0"\nconnect_timeout = 0.1\nretries = 0\n')
    return str(config)


@pytest.mark.parametrize("argv", [["readonly", "list"], ["readonly", "set", "team/app"], ["migrate", "status"],
                                  ["jobs", "status"], ["migrate", "team/app"]])
def test_a_dependency_down_is_one_line_and_exit_1_not_a_traceback(tmp_path, argv):
    result = subprocess.run([sys.executable, "-m", "regmw.cli", "-c", _down_redis_config(tmp_path), *argv],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("regmw: ConnectionError: ")


def test_a_config_file_that_is_not_utf8_is_a_configuration_error(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_bytes(b'[regmw]\nlog_level = "\xff"\n')
    for argv in (["-c", str(config), "plugins"], ["check-config", str(config)]):
        assert main(argv) == 2
        assert capsys.readouterr().err == f"regmw: configuration error: {config}: not valid TOML: not UTF-8 (byte 21)\n"


@pytest.mark.parametrize("argv", [
    ["readonly", "set", "team/app", "--ttl", "nan"], ["readonly", "set", "team/app", "--ttl", "inf"],
    ["readonly", "set", "team/app", "--ttl", "0"], ["readonly", "set", "team/app", "--ttl", "-5"],
    ["readonly", "set", "team/app", "--ttl", "1e30"], ["worker", "--threads", "0"],
    ["migrate", "team/app", "--rate", "-1"], ["migrate", "team/app", "--rate", "nan"],
    ["serve", "--app", "no_such_module:app", "--port", "70000"], ["serve", "--app", "no_such_module:app", "--host", ""],
    ["demo", "--port", "65536"],
])
def test_bad_option_values_are_usage_errors_before_anything_runs(tmp_path, argv):
    # A process of its own with Redis down: an accepted value fails (or is stopped by the timeout), nothing serves.
    result = subprocess.run([sys.executable, "-m", "regmw.cli", "-c", _down_redis_config(tmp_path), *argv],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()  # one line, as every other error (click's own block spans four)
    assert line.startswith("regmw: Invalid value for ") and f"'{argv[-2]}'" in line and "--help')" in line


def test_config_option_goes_after_every_plugin_group_name(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(f'[regmw]\nplugins = ["notifications"]\n[notifications]\nspool_dir = "{tmp_path}/spool"\n'
                      'allowed_networks = ["127.0.0.0/8"]\nendpoints = [{name = "hook", url = "http://127.0.0.1:9/"}]\n')
    assert main(["notifications", "-c", str(config), "status", "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["hook"]["depth"] == 0
    assert main(["notifications", "dead-letters", "-c", str(config), "list"]) == 0, capsys.readouterr().err
