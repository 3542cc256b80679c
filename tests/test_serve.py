"""`regmw serve` and the `regmw.wsgi` entry point, as real processes on real sockets."""
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from regmw.demo.registry import create_app

from .servers._util import free_port, http_request, stop, wait_for_port


def get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.fixture
def run_regmw(tmp_path):
    procs = []

    def start(*args: str, env: dict | None = None) -> str:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "regmw.cli", *args, "--port", str(port)],
                                env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        wait_for_port(port, proc=proc, timeout=20)
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        stop(proc)


def test_serve_reference_registry(tmp_path, run_regmw):
    config = tmp_path / "regmw.toml"
    config.write_text('[[ratelimit.rules]]\nby = "client"\nlimit = "100/minute"\n')
    base = run_regmw("--config", str(config), "serve", "--registry-root", str(tmp_path / "data"))
    status, headers, _ = get(base + "/v2/")
    assert status == 200 and headers["RateLimit-Limit"] == "100"
    status, _, body = get(base + "/v2/Bad..Name/tags/list")
    assert status == 400 and json.loads(body)["errors"][0]["code"] == "NAME_INVALID"


def test_serve_takes_the_scheme_and_script_name_from_the_trusted_proxies_only(tmp_path, run_regmw):
    """gunicorn's own default believes X-Forwarded-Proto (and SCRIPT_NAME headers) from any loopback
    client; under ``regmw serve`` it believes ``[regmw] trusted_proxies``, as regmw does."""
    import http.client

    config = tmp_path / "regmw.toml"
    config.write_text('[regmw]\ntrusted_proxies = ["127.0.0.2/32"]\n')
    base = run_regmw("--config", str(config), "serve", "--app", "tests.servers.plain_app:scheme_app")
    port = int(base.rsplit(":", 1)[1])

    def seen_from(source: str) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
        try:
            conn.request("GET", "/mounted/v2/", headers={"X-Forwarded-Proto": "https", "SCRIPT_NAME": "/mounted"})
            response = conn.getresponse()
            assert response.status == 200
            return response.read().decode()
        finally:
            conn.close()

    assert seen_from("127.0.0.1") == "http ''"  # a client on loopback, not a trusted proxy
    assert seen_from("127.0.0.2") == "https '/mounted'"  # the trusted proxy


def test_serve_as_gateway_in_front_of_a_registry(tmp_path, run_regmw, serve_wsgi):
    upstream = serve_wsgi(create_app(str(tmp_path / "upstream")))
    config = tmp_path / "gateway.toml"
    config.write_text(f'[gateway]\nupstream = "{upstream}"\n[[ratelimit.rules]]\nby = "repository"\nlimit = "5/minute"\n')
    base = run_regmw("--config", str(config), "serve")
    status, headers, body = get(base + "/v2/team/app/tags/list")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"  # answered by the upstream
    assert headers["RateLimit-Remaining"] == "4"  # counted by regmw on the way


def test_serve_refuses_an_api_path_a_client_starts_in_script_name(tmp_path, run_regmw, serve_wsgi):
    """gunicorn sets SCRIPT_NAME from a ``SCRIPT_NAME`` request header of a peer in its forwarded_allow_ips
    (``[regmw] trusted_proxies`` under ``regmw serve``: here loopback, as a proxy on the same host would be
    listed) and the gateway forwards SCRIPT_NAME + PATH_INFO, while regmw checks PATH_INFO.

    A DELETE whose API path started in that header reached the upstream with no check, limit, lock or
    classification; a read named one repository to regmw (team/app) and another to the upstream.
    """
    seen = []

    def upstream(environ, start_response):
        seen.append(environ["PATH_INFO"])
        start_response("202 Accepted", [("Content-Length", "0")])
        return [b""]

    config = tmp_path / "gateway.toml"
    config.write_text(f'[regmw]\ntrusted_proxies = ["127.0.0.1/32"]\n'
                      f'[gateway]\nupstream = "{serve_wsgi(upstream)}"\n[serve]\nworkers = 1\n')
    base = run_regmw("--config", str(config), "serve")
    for method, target, script in [("DELETE", "/v2/team/app/manifests/latest", "/v2/team/app"),
                                   ("GET", "/v2/other/v2/team/app/tags/list", "/v2/other"),
                                   ("GET", "/v2/team/app/tags/list", "/v2")]:
        status, _, body = http_request(base, method, target, headers={"SCRIPT_NAME": script})
        assert status == 400 and json.loads(body)["errors"][0]["code"] == "NAME_INVALID", (target, body)
    assert seen == []
    assert http_request(base, "DELETE", "/v2/team/app/manifests/latest")[0] == 202 and seen == ["/v2/team/app/manifests/latest"]


def test_serve_refuses_a_strategy_the_embedded_limiter_does_not_count_in_one_line(tmp_path):
    """Refused before gunicorn starts, as check-config refuses it (it was a traceback per worker)."""
    config = tmp_path / "regmw.toml"
    config.write_text('[ratelimit]\nstrategy = "moving-window"\n[[ratelimit.rules]]\nby = "client"\nlimit = "1/second"\n')
    result = subprocess.run([sys.executable, "-m", "regmw.cli", "--config", str(config), "serve",
                             "--registry-root", str(tmp_path / "data"), "--port", str(free_port())],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"regmw: configuration error: {config}: ratelimit.strategy 'moving-window' is not counted by the embedded "
        'rate limiter (one of: fixed-window, sliding-window-counter; moving-window needs the redis plugin with '
        'hot_path = "limits")']


def test_serve_without_anything_to_serve_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "regmw.cli", "serve", "--port", "0"],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "REGMW_CONFIG": ""})
    assert result.returncode == 2
    assert "gateway.upstream" in result.stderr and "Traceback" not in result.stderr


REPLACES_THE_RATE_LIMITER = """
from regmw import RateLimitResult, hookimpl

class Always:
    def hit(self, context):
        return RateLimitResult(allowed=True, limit=1, rule="always")

@hookimpl
def regmw_rate_limiter(config, services):
    return Always()
"""

RAISES_IN_A_PROVIDER = """
from regmw import hookimpl

@hookimpl
def regmw_cache(config, services):
    raise RuntimeError("cache backend exploded\\nsecond line")
"""


@pytest.mark.parametrize("source, line, code", [
    (REPLACES_THE_RATE_LIMITER, "regmw: configuration error: {config}: ratelimit.rules client-any-0 would not "
                                "be counted: plugin regmw_audit_plugin.boot provides Always", 2),
    (RAISES_IN_A_PROVIDER, "regmw: start-up failed: RuntimeError: cache backend exploded\n", 1),
], ids=["refused-once-built", "provider-raises"])
def test_a_plugin_failing_only_when_the_backends_are_built_stops_serve_in_one_line(tmp_path, source, line, code):
    """What the master's validation cannot see (it builds no backend) stops start-up before any worker
    starts: one line and the documented exit status (it was gunicorn's "App failed to load" lines and
    its exit status 4), never a worker's traceback."""
    package = tmp_path / "regmw_audit_plugin"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "boot.py").write_text(source)
    config = tmp_path / "regmw.toml"
    config.write_text('[regmw]\nplugins = ["regmw_audit_plugin.boot"]\n[serve]\nworkers = 1\n'
                      '[[ratelimit.rules]]\nby = "client"\nlimit = "10/minute"\n')
    result = subprocess.run(
        [sys.executable, "-m", "regmw.cli", "-c", str(config), "serve", "--port", "0",
         "--registry-root", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == code and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(line.format(config=config))


@pytest.mark.parametrize("spec, reason", [("no_such_module:app", "No module named 'no_such_module'"),
                                          ("json:no_such_app", "module 'json' has no attribute 'no_such_app'")])
def test_serve_with_an_app_that_does_not_load_is_one_line_and_exit_2(tmp_path, spec, reason):
    result = subprocess.run([sys.executable, "-m", "regmw.cli", "serve", "--port", "0", "--app", spec],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "REGMW_CONFIG": ""})
    assert (result.returncode, result.stderr) == (2, f"regmw: configuration error: --app {spec}: cannot load ({reason})\n")


def test_wsgi_entry_point_reads_regmw_config(tmp_path):
    config = tmp_path / "regmw.toml"
    config.write_text('[regmw]\nlog_level = "WARNING"\n')
    code = ("from werkzeug.test import Client; import regmw.wsgi as w; "
            "r = Client(w.application).get('/v2/'); print(r.status_code, w.application.runtime.config.source)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "REGMW_CONFIG": str(config), "REGMW_REGISTRY_ROOT": str(tmp_path / "d")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["200", str(config)]


def test_serve_on_a_port_in_use_is_one_line_at_once(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "regmw.cli", "serve", "--port", str(port),
                                 "--registry-root", str(tmp_path)], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "REGMW_CONFIG": ""})
    assert result.returncode == 1
    assert result.stderr == f"regmw: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_serve_with_metrics_listen_on_a_port_in_use_is_one_line_at_once(tmp_path):
    """It was the metrics server's traceback from gunicorn's when_ready, after the API port was bound."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "regmw.toml"
        config.write_text(f'[serve]\nworkers = 1\nmetrics_listen = "127.0.0.1:{port}"\n')
        result = subprocess.run([sys.executable, "-m", "regmw.cli", "-c", str(config), "serve", "--port", "0",
                                 "--registry-root", str(tmp_path / "data")], capture_output=True, text=True,
                                timeout=60, env={**os.environ, "REGMW_CONFIG": ""})
    assert (result.returncode, result.stderr) == (
        1, f"regmw: [serve] metrics_listen: cannot listen on 127.0.0.1:{port}: Address already in use\n")
