"""CLI commands that need a shared store refuse to pretend without one; with Redis they work."""
import pytest

from regmw.cli import main


def test_readonly_and_migrate_mark_refuse_the_in_process_defaults(capsys):
    assert main(["readonly", "set", "group/app"]) == 2
    assert "shared lock store" in capsys.readouterr().err
    assert main(["readonly", "set", "Bad..Name"]) == 2


def test_migrate_mark_refuses_the_in_process_cache(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('[regmw]\nplugins = ["migration"]\n[migration]\nnew_root = "gitlab/v2"\n')
    assert main(["-c", str(config), "migrate-mark", "group/app"]) == 2
    assert "shared cache" in capsys.readouterr().err
    assert main(["-c", str(config), "migrate-mark", "../etc"]) == 2


def test_migrate_mark_through_redis_changes_what_servers_decide(tmp_path, redis_server, capsys):
    from werkzeug.test import Client

    from regmw import RegistryMiddleware

    _, url = redis_server
    (tmp_path / "old/repositories/group/app").mkdir(parents=True)
    (tmp_path / "old/repositories/group/app/x").write_text("x")
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
