"""Plugin loading: entry points from an installed distribution, `regmw plugins`."""
import importlib
import sys
import textwrap

import pytest
from werkzeug.test import Client

from regmw import RegistryMiddleware, build
from regmw.cli import main


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A third-party distribution on sys.path, registering `regmw_hello` in the `regmw` group.

    This is what `pip install` leaves behind (a module plus a .dist-info with
    entry_points.txt); importlib.metadata finds it exactly as it finds a
    pip-installed plugin.
    """
    install(tmp_path, monkeypatch, "regmw_hello", '''
        from regmw import Option, Refusal, Section, hookimpl

        @hookimpl
        def regmw_config_sections():
            return [Section("hello", "greeting plugin", {"banned": Option("list", [], "banned repositories")})]

        @hookimpl
        def regmw_admit(context):
            if context.repository in context.services.config["hello"]["banned"]:
                return Refusal(403, "DENIED", "banned by hello")

        @hookimpl
        def regmw_response_started(context, status, headers):
            headers.append(("X-Hello", context.repository or "-"))
    ''', project="regmw-hello", entry="hello")
    yield
    sys.modules.pop("regmw_hello", None)


def app(environ, start_response):
    start_response("200 OK", [])
    return [b"ok"]


def test_entry_point_plugin_is_loaded_and_its_hooks_and_config_work(installed_plugin):
    middleware = RegistryMiddleware(app, {"hello": {"banned": ["bad/repo"]}}, environ={})
    client = Client(middleware)
    ok = client.get("/v2/good/repo/tags/list")
    assert ok.headers["X-Hello"] == "good/repo"
    assert client.get("/v2/bad/repo/tags/list").status_code == 403


def test_entry_points_can_be_disabled(installed_plugin):
    with pytest.raises(Exception, match="unknown section \\[hello\\]"):
        build({"regmw": {"entry_points": False}, "hello": {}}, environ={})


def test_one_entry_point_plugin_can_be_disabled_while_the_others_load(installed_plugin, tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "regmw_other", """
        from regmw import hookimpl

        @hookimpl
        def regmw_response_started(context, status, headers):
            headers.append(("X-Other", "yes"))
    """, project="regmw-other", entry="other")
    for config, environ in (({"regmw": {"disable_plugins": ["hello"]}}, {}),
                            ({}, {"REGMW_DISABLE_PLUGINS": "hello, not-installed"})):
        response = Client(RegistryMiddleware(app, config, environ=environ)).get("/v2/bad/repo/tags/list")
        assert response.status_code == 200 and "X-Hello" not in response.headers  # hello's admit and header: gone
        assert response.headers["X-Other"] == "yes"
    with pytest.raises(Exception, match="unknown section \\[hello\\]"):  # its configuration is gone with it
        build({"regmw": {"disable_plugins": ["hello"]}, "hello": {}}, environ={})


def test_a_flask_app_config_disables_an_entry_point_plugin(installed_plugin):
    from flask import Flask

    from regmw.flask import RegMW

    flask_app = Flask("registry")
    flask_app.config["REGMW_DISABLE_PLUGINS"] = "hello"

    @flask_app.get("/v2/<path:name>/tags/list")
    def tags(name):
        return {"name": name}

    RegMW(flask_app, config={})
    response = flask_app.test_client().get("/v2/good/repo/tags/list")
    assert response.status_code == 200 and "X-Hello" not in response.headers


@pytest.mark.parametrize("name", ["redis", "regmw_redis", "regmw.defaults.core"])
def test_disable_plugins_refuses_a_builtin_or_default(name):
    with pytest.raises(Exception, match=f"regmw.disable_plugins: '{name}' is not an entry-point plugin"):
        build({"regmw": {"disable_plugins": [name]}}, environ={})


def test_regmw_plugins_shows_a_disabled_entry_point(installed_plugin, tmp_path, capsys):
    config = tmp_path / "regmw.toml"
    config.write_text('[regmw]\ndisable_plugins = ["hello"]\n')
    assert main(["plugins", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "hello  (disabled ([regmw] disable_plugins))" in out
    assert "regmw_admit" not in out.split("hello  (disabled")[1].split("\n\n")[0]


def test_regmw_plugins_lists_builtins_and_entry_points(installed_plugin, capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "regmw.defaults.memory_cache  (embedded default)" in out
    assert "hello  (entry point (regmw-hello 1.0))" in out
    hello_block = out.split("hello  (entry point")[1]
    assert "regmw_admit" in hello_block and "regmw_response_started" in hello_block


def test_regmw_plugins_builds_nothing(tmp_path, monkeypatch, capsys):
    """`regmw plugins` validates the configuration but runs no provider hook and no regmw_startup
    (which start threads and connect: dbroute's health check, notifications' delivery thread), so
    it lists a plugin whose backend cannot be built."""
    install(tmp_path, monkeypatch, "regmw_unbuildable", """
        from regmw import hookimpl

        @hookimpl
        def regmw_cache(config, services):
            raise RuntimeError("cache backend unreachable")

        @hookimpl
        def regmw_startup(services):
            raise RuntimeError("started")
    """, project="regmw-unbuildable", entry="unbuildable")
    try:
        assert main(["plugins"]) == 0
        out = capsys.readouterr().out
        assert "unbuildable  (entry point (regmw-unbuildable 1.0))\n    regmw_cache\n    regmw_startup\n" in out
        bad = tmp_path / "bad.toml"
        bad.write_text("[cache]\nmax_entries = 'many'\n")
        assert main(["-c", str(bad), "plugins"]) == 2  # still validated as start-up does
        assert "cache.max_entries" in capsys.readouterr().err
    finally:
        sys.modules.pop("regmw_unbuildable", None)


def test_builtin_plugins_are_enabled_by_name(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('[regmw]\nplugins = ["migration"]\n[migration]\nnew_root = "gitlab/v2"\n')
    assert main(["--config", str(config), "plugins"]) == 0
    assert "regmw_migration  (built-in)" in capsys.readouterr().out


def install(tmp_path, monkeypatch, name: str, source: str | None, project: str | None = None,
            entry: str | None = None) -> None:
    """A distribution whose `regmw` entry point `entry` is module `name` (absent when source is None).

    ``project`` (the distribution's name) and ``entry`` default to ``name``. Also used by test_cli.
    """
    if source is not None:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    dist = tmp_path / f"{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project or name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[regmw]\n{entry or name} = {name}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()


LOADED = "entry point broken = regmw_broken (regmw-broken 1.0) failed to load: "


@pytest.mark.parametrize(
    "source, message",
    [
        (None, LOADED + "ModuleNotFoundError: No module named 'regmw_broken'"),
        ("from regmw import hookimpl\n@hookimpl\ndef regmw_finish(ctx, status_code):\n    pass\n",
         LOADED + "PluginValidationError: Plugin 'broken' for hook 'regmw_finish'; "
                  "hookimpl definition: regmw_finish(ctx, status_code); Argument(s) {"),
        ("from regmw import hookimpl\n@hookimpl\ndef regmw_admitt(context):\n    pass\n",
         "plugin broken (entry point (regmw-broken 1.0)): unknown hook 'regmw_admitt'"),
    ],
    ids=["missing-module", "wrong-argument", "misspelled-hook"],
)
def test_a_broken_third_party_plugin_is_one_config_error(tmp_path, monkeypatch, capsys, source, message):
    """One line naming the entry point and its distribution (pluggy's own message spans three)."""
    install(tmp_path, monkeypatch, "regmw_broken", source, project="regmw-broken", entry="broken")
    try:
        with pytest.raises(Exception) as error:
            build({}, environ={})
        assert type(error.value).__name__ == "ConfigError" and message in str(error.value)
        assert main(["plugins"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("regmw: configuration error: " + message) and err.count("\n") == 1
        assert "Traceback" not in err
    finally:
        sys.modules.pop("regmw_broken", None)


def test_config_docs_and_check_config_show_an_entry_point_plugins_section(installed_plugin, tmp_path, capsys):
    """docs/hooks.md: a plugin's sections "appear in `regmw config-docs`"; check-config names the plugin."""
    assert main(["config-docs"]) == 0
    out = capsys.readouterr().out
    assert "## [hello]\n\ngreeting plugin (from `hello`)" in out
    assert "| `banned` | list | `[]` | banned repositories |" in out
    assert out.index("## [redis]") < out.index("## [hello]")  # regmw's own reference first, unchanged
    # regmw's own reference (docs/configuration.md) does not depend on what else is installed
    assert main(["config-docs", "--builtin-only"]) == 0
    assert "[hello]" not in capsys.readouterr().out
    assert main(["config-docs", "--check", "docs/configuration.md"]) == 0
    off = tmp_path / "off.toml"
    off.write_text("[regmw]\nentry_points = false\n")
    assert main(["config-docs", "-c", str(off)]) == 0
    assert "[hello]" not in capsys.readouterr().out

    config = tmp_path / "hello.toml"
    config.write_text('[hello]\nbanned = ["a/b"]\n')
    assert main(["check-config", str(config)]) == 0
    assert capsys.readouterr().out == f"{config}: ok (hello (entry point))\n"
    config.write_text('[hello]\nbanned = "a/b"\nban = []\n')
    assert main(["check-config", str(config)]) == 2
    assert "unknown key hello.ban" in capsys.readouterr().err


def test_config_docs_without_a_builtins_extra_still_shows_a_plugins_section(installed_plugin, monkeypatch, capsys):
    """A plain `pip install regmw` has no google-cloud-storage or sqlalchemy: `regmw config-docs` must still
    print regmw's sections and the installed plugin's, leaving the unimportable built-in out with a note."""
    monkeypatch.setitem(sys.modules, "regmw_gcs", None)  # importing it fails, as without the gcs extra
    assert main(["config-docs"]) == 0
    captured = capsys.readouterr()
    assert "## [hello]" in captured.out and "## [redis]" in captured.out and "## [gcs]" not in captured.out
    assert captured.err.count("\n") == 1 and "plugin 'gcs' cannot be imported" in captured.err
    assert "pip install 'regmw[gcs]'" in captured.err
    # regmw's whole reference cannot be printed without it: refused, one line
    assert main(["config-docs", "--builtin-only"]) == 2
    assert "plugin 'gcs' cannot be imported" in capsys.readouterr().err


@pytest.mark.parametrize(
    "source, message",
    [
        ("@hookimpl\ndef regmw_config_sections():\n    raise RuntimeError('sections boom')\n",
         "plugin sloppy: regmw_config_sections raised RuntimeError: sections boom"),
        ("@hookimpl\ndef regmw_config_sections():\n    return Section('sloppy', 'x', {'v': Option('str', 'a', 'v')})\n",
         "plugin sloppy: regmw_config_sections must return a list of regmw.Section (got Section)"),
        ("@hookimpl\ndef regmw_config_sections():\n    return [Section('sloppy', 'x', {'v': Option('string', 'a')})]\n",
         "plugin sloppy: option sloppy.v has an unknown type 'string' (one of: str, path, int, "),
        ("def rule(values, config):\n    return config['nosuch']['x']\n\n"
         "@hookimpl\ndef regmw_config_sections():\n"
         "    return [Section('sloppy', 'x', {'v': Option('str', 'a')}, checks=(rule,))]\n",
         "[sloppy] rule rule failed: KeyError: 'nosuch'"),
    ],
    ids=["sections-raise", "not-a-list", "unknown-option-type", "rule-raises"],
)
def test_a_plugins_bad_config_declaration_is_one_line_naming_it(tmp_path, monkeypatch, capsys, source, message):
    """A bug in what a plugin declares stops start-up with one line naming the plugin (or its section and
    rule), not a bare `KeyError: 'nosuch'`, nor an unknown option type accepted until a value is set."""
    install(tmp_path, monkeypatch, "regmw_sloppy", "from regmw import Option, Section, hookimpl\n\n" + source,
            project="regmw-sloppy", entry="sloppy")
    config = tmp_path / "sloppy.toml"
    config.write_text("")
    try:
        with pytest.raises(Exception) as error:
            build({}, environ={})
        assert type(error.value).__name__ == "ConfigError" and message in str(error.value)
        assert main(["check-config", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("regmw: configuration error: ") and message in err and err.count("\n") == 1
    finally:
        sys.modules.pop("regmw_sloppy", None)
