"""The Flask extension by Flask's conventions: per-app state, init_app for factories, app.config as configuration."""
import logging

import pytest
from flask import Flask
from werkzeug.test import Client

from regmw import BackendUnavailable, ConfigError, build, metrics
from regmw.flask import RegMW, current_context, state

from .test_sendfile import Finishes


def make_app(**config):
    app = Flask(__name__)
    app.config.update(config)

    @app.route("/v2/<path:rest>")
    def anything(rest):
        return {"repository": current_context().repository}

    return app


def test_app_config_is_configuration_flat_keys_and_sections():
    app = make_app(REGMW={"ratelimit": {"rules": [{"by": "global", "limit": "1/minute"}]}},
                   REGMW_CACHE_MAX_ENTRIES=3)
    RegMW(app)
    assert app.extensions["regmw"].runtime.services.cache.max_entries == 3
    client = Client(app)
    assert client.get("/v2/a/b/tags/list").json == {"repository": "a/b"}
    assert client.get("/v2/a/b/tags/list").status_code == 429


def test_app_config_wins_over_the_file_and_is_typed_not_an_environment(tmp_path):
    path = tmp_path / "regmw.toml"
    path.write_text("[cache]\nmax_entries = 5\nmax_bytes = 4096\n")
    app = make_app(REGMW_CONFIG=str(path), REGMW={"cache": {"max_bytes": 8192}}, REGMW_CACHE_MAX_ENTRIES=7,
                   REGMW_TRUSTED_PROXIES=["10.0.0.0/8"])  # a real list, not a comma-separated string
    RegMW().init_app(app)
    config = state(app).runtime.config
    assert config["cache"]["max_entries"] == 7 and config["cache"]["max_bytes"] == 8192
    assert [str(net) for net in config["regmw"]["trusted_proxies"]] == ["10.0.0.0/8"]
    assert config.source == str(path)


def test_a_flat_key_naming_no_option_is_refused():
    with pytest.raises(ConfigError, match="REGMW_CACHE_SIZE names no option"):
        RegMW(make_app(REGMW_CACHE_SIZE=1))
    with pytest.raises(ConfigError, match="unknown key cache.size"):
        RegMW().init_app(make_app(REGMW={"cache": {"size": 1}}))


def test_flat_keys_of_a_plugin_enabled_by_a_flat_key():
    app = make_app(REGMW_PLUGINS=["migration"], REGMW_MIGRATION_NEW_ROOT="gitlab/v2")
    RegMW(app)
    assert state(app).runtime.config["migration"]["new_root"] == "gitlab/v2"


def test_one_extension_serves_several_apps_each_with_its_own_runtime():
    """An app factory: one RegMW(), init_app per app; limits, caches and contexts never leak between apps."""
    regmw = RegMW()

    def create_app(limit):
        app = make_app(REGMW={"ratelimit": {"rules": [{"by": "global", "limit": limit}]}})
        regmw.init_app(app)
        return app

    strict, lenient = create_app("1/minute"), create_app("3/minute")
    assert state(strict).runtime is not state(lenient).runtime
    assert state(strict).runtime.services.cache is not state(lenient).runtime.services.cache
    strict_client, lenient_client = Client(strict), Client(lenient)
    assert strict_client.get("/v2/a/b/tags/list").status_code == 200
    assert strict_client.get("/v2/a/b/tags/list").status_code == 429
    assert [lenient_client.get("/v2/a/b/tags/list").status_code for _ in range(4)] == [200, 200, 200, 429]
    with strict.app_context():
        assert state() is strict.extensions["regmw"]


def test_init_app_twice_on_one_app_is_refused():
    app = make_app()
    regmw = RegMW(app)
    with pytest.raises(RuntimeError, match="already initialised"):
        regmw.init_app(app)


def test_building_a_runtime_leaves_the_logging_levels_alone():
    logger = logging.getLogger("regmw")
    before = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        build({"regmw": {"log_level": "DEBUG"}}, environ={})
        RegMW(make_app(REGMW={"regmw": {"log_level": "DEBUG"}}))
        assert logger.level == logging.CRITICAL
    finally:
        logger.setLevel(before)


def test_regmw_config_in_the_environment_names_the_file_when_the_app_names_none(tmp_path, monkeypatch):
    """As for RegistryMiddleware(app): $REGMW_CONFIG is the file unless app.config or RegMW(config=...) names one."""
    from_env, from_app = tmp_path / "env.toml", tmp_path / "app.toml"
    from_env.write_text("[cache]\nmax_entries = 5\n")
    from_app.write_text("[cache]\nmax_entries = 6\n")
    monkeypatch.setenv("REGMW_CONFIG", str(from_env))
    app = make_app()
    RegMW(app)
    assert state(app).runtime.config["cache"]["max_entries"] == 5
    assert state(app).runtime.config.source == str(from_env)
    named = make_app(REGMW_CONFIG=str(from_app))
    RegMW(named)
    assert state(named).runtime.config["cache"]["max_entries"] == 6


def backend_down_app(**config):
    app = Flask(__name__)
    app.config.update(config)

    @app.route("/v2/<path:rest>")
    @app.route("/plain")
    def down(rest=None):
        raise BackendUnavailable("redis at 10.1.2.3:6379 timed out")

    return app


@pytest.mark.parametrize("testing", [False, True])
def test_a_views_backend_unavailable_is_the_middlewares_oci_503(testing):
    """Flask turns a view's exception into its own 500 page before regmw sees it; regmw answers as for any WSGI app."""
    app = backend_down_app(TESTING=testing)
    finishes = Finishes()
    RegMW(app, plugins=[finishes])
    refused = metrics.refusals.labels("backend_unavailable")
    before = refused._value.get()
    response = Client(app).get("/v2/a/b/tags/list")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json["errors"][0]["code"] == "UNAVAILABLE"
    assert "10.1.2.3" not in response.get_data(as_text=True)
    response.close()
    assert finishes.statuses == [503]
    assert refused._value.get() == before + 1


@pytest.mark.parametrize("testing", [False, True])
def test_a_views_other_error_on_the_api_is_an_oci_500_propagated_or_not(testing):
    """Flask's HTML 500 page is replaced on API requests: the OCI 500, finished and counted as app_error."""
    app = Flask(__name__)
    app.config["TESTING"] = testing

    @app.route("/v2/<path:rest>")
    @app.route("/plain")
    def broken(rest=None):
        raise RuntimeError("SECRET detail")

    finishes = Finishes()
    RegMW(app, plugins=[finishes])
    refused = metrics.refusals.labels("app_error")
    before = refused._value.get()
    response = Client(app).get("/v2/a/b/tags/list")
    assert response.status_code == 500 and b"SECRET" not in response.data
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json["errors"][0]["code"] == "UNKNOWN"
    assert response.headers["X-Request-Id"]
    response.close()
    assert finishes.statuses == [500]
    assert refused._value.get() == before + 1
    if not testing:  # off the API, Flask's own page
        plain = Client(app).get("/plain")
        assert plain.status_code == 500 and plain.headers["Content-Type"].startswith("text/html")


def test_the_apps_own_500_handler_wins_registered_before_or_after_init_app():
    before = Flask(__name__)
    before.register_error_handler(500, lambda error: ("mine", 500))
    after = Flask(__name__)
    for app in (before, after):
        @app.route("/v2/<path:rest>")
        def broken(rest):
            raise RuntimeError("boom")

        RegMW(app)
    after.register_error_handler(500, lambda error: ("mine", 500))
    for app in (before, after):
        response = Client(app).get("/v2/a/b/tags/list")
        assert (response.status_code, response.data) == (500, b"mine")


def test_the_apps_own_backend_unavailable_handler_and_non_api_paths_keep_flasks_handling():
    app = backend_down_app()

    @app.errorhandler(BackendUnavailable)
    def mine(exc):
        return "mine", 599

    RegMW(app)
    assert Client(app).get("/v2/a/b/tags/list").status_code == 599
    plain = backend_down_app()
    RegMW(plain)
    assert Client(plain).get("/plain").status_code == 500


def test_current_context_is_the_requests_none_off_the_api_and_an_error_outside_a_request():
    app = Flask(__name__)
    seen = {}

    @app.route("/v2/<path:rest>")
    @app.route("/plain")
    def view(rest=None):
        from flask import request

        seen[rest] = current_context() is request.environ.get("regmw.context") and current_context()
        return "ok"

    RegMW(app)
    client = Client(app)
    client.get("/v2/a/b/tags/list")
    client.get("/plain")
    assert seen["a/b/tags/list"].repository == "a/b"
    assert seen[None] is None
    with pytest.raises(RuntimeError, match="outside of request context"):
        current_context()
    with app.app_context(), pytest.raises(RuntimeError, match="outside of request context"):
        current_context()
