"""`regmw serve` on gunicorn, as real processes on real sockets, in front of a real docker-registry.

skopeo pushes and pulls through it; SIGTERM in the middle of a 200 MiB pull
lets the pull finish while new connections are refused; metrics come from
every worker on the separate metrics address; health/ready; the JSON access log.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.oci_image import write_oci_layout
from tests.servers._util import free_port, stop, wait_for_port, wait_until, workers_of
from tests.servers._util import http_request as request
from tests.test_registry_e2e import assert_same_image, docker_ref, skopeo  # noqa: F401 - skopeo is a fixture

REPO = "group/project"
MIB = 1024 * 1024


@dataclass
class Served:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path
    metrics_port: int | None
    config: Path

    def log_lines(self) -> list[dict]:
        """The JSON access log lines written so far (other stderr lines are gunicorn's)."""
        lines = []
        for raw in self.log.read_text(errors="replace").splitlines():
            if raw.startswith("{"):
                lines.append(json.loads(raw))
        return lines


@pytest.fixture
def regmw_serve(tmp_path):
    """``start(config_text, metrics=False)``: `regmw serve` (gunicorn) on a free port; stopped by PID."""
    started: list[subprocess.Popen] = []

    def start(config_text: str, metrics: bool = False, workers: int = 2, serve_extra: str = "",
              args: tuple[str, ...] = ()) -> Served:
        port = free_port()
        metrics_port = free_port() if metrics else None
        serve = f"[serve]\nworkers = {workers}\nthreads = 8\n{serve_extra}"
        if metrics_port:
            serve += f'metrics_listen = "127.0.0.1:{metrics_port}"\n'
        config = tmp_path / f"regmw-{port}.toml"
        config.write_text(serve + config_text)
        log = tmp_path / f"regmw-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "regmw.cli", "--config", str(config), "serve",
                                     "--port", str(port), *args], stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "REGMW_CONFIG": ""})
        started.append(proc)
        wait_for_port(port, proc=proc, timeout=30)
        if metrics_port:
            wait_for_port(metrics_port, proc=proc, timeout=30)
        return Served(f"http://127.0.0.1:{port}", port, proc, log, metrics_port, config)

    yield start
    for proc in started:
        stop(proc, timeout=10)


def gateway_config(upstream: str) -> str:
    return (f'[regmw]\nentry_points = false\n[gateway]\nupstream = "{upstream}"\n'
            '[[ratelimit.rules]]\nby = "client"\nlimit = "100000/minute"\nname = "per-client"\n')




def push_blob(url: str, blocks: list[bytes]) -> str:
    """Push one blob (the concatenation of ``blocks``, streamed) monolithically; return its digest."""
    digest = hashlib.sha256()
    for block in blocks:
        digest.update(block)
    digest = "sha256:" + digest.hexdigest()
    status, headers, _ = request(url, "POST", f"/v2/{REPO}/blobs/uploads/")
    assert status == 202, status
    location = urlsplit(headers["Location"])
    target = f"{location.path}?{location.query}&digest={digest}"
    status, _, body = request(url, "PUT", target, body=iter(blocks),
                              headers={"Content-Length": str(sum(map(len, blocks))),
                                       "Content-Type": "application/octet-stream"})
    assert status == 201, body
    return digest


# --- skopeo through gunicorn -----------------------------------------------------


@pytest.mark.services
def test_skopeo_push_and_pull_through_regmw_serve(tmp_path, docker_registry, regmw_serve, skopeo):  # noqa: F811
    served = regmw_serve(gateway_config(docker_registry.url))
    image = write_oci_layout(tmp_path / "image")

    skopeo(f"oci:{image.path}:latest", docker_ref(served.url))
    skopeo(docker_ref(served.url), f"oci:{tmp_path / 'pulled'}:latest")

    assert_same_image(image, tmp_path / "pulled")
    # pushed through regmw into the real registry, which holds it
    status, _, body = request(docker_registry.url, "GET", f"/v2/{REPO}/tags/list")
    assert status == 200 and json.loads(body)["tags"] == ["latest"]
    patched = [line for line in served.log_lines() if line["method"] == "PATCH"]
    assert patched and all(line["status"] == 202 and line["resource"] == "uploads" for line in patched)


# --- graceful shutdown --------------------------------------------------------------


def connection_refused(port: int) -> bool:
    """True once the port refuses; a connection reset (caught in the backlog as it closed) is not yet that."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False


@pytest.mark.services
def test_sigterm_lets_a_200_mib_pull_finish_and_refuses_new_connections(docker_registry, regmw_serve):
    block = os.urandom(MIB)
    blocks = [block] * 200
    digest = push_blob(docker_registry.url, blocks)
    served = regmw_serve(gateway_config(docker_registry.url))

    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    conn.request("GET", f"/v2/{REPO}/blobs/{digest}")
    response = conn.getresponse()
    assert response.status == 200 and int(response.getheader("Content-Length")) == 200 * MIB
    hasher = hashlib.sha256()
    first = response.read(MIB)
    hasher.update(first)

    served.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    while not connection_refused(served.port):  # poll for the condition, bounded
        assert time.monotonic() < deadline, "still accepting connections 20 s after SIGTERM"
        time.sleep(0.05)
    assert served.proc.poll() is None  # still draining our pull

    received = len(first)
    while chunk := response.read(4 * MIB):
        hasher.update(chunk)
        received += len(chunk)
    conn.close()
    assert received == 200 * MIB and "sha256:" + hasher.hexdigest() == digest
    assert served.proc.wait(timeout=30) == 0  # exits once the pull is done, well before graceful_timeout
    assert connection_refused(served.port)


@pytest.mark.services
def test_sighup_reloads_a_good_configuration_and_keeps_serving_on_a_bad_one(docker_registry, regmw_serve):
    served = regmw_serve(gateway_config(docker_registry.url), workers=1)
    good = served.config.read_text()
    assert request(served.url, "GET", "/v2/")[1]["RateLimit-Limit"] == "100000"

    served.config.write_text(good + "[serve.typo]\n")  # cannot start: unknown key
    served.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: served.proc.poll() is not None or "not reloaded" in served.log.read_text(),
               timeout=30, what="the reload's outcome")
    assert served.proc.poll() is None  # gunicorn alone would stop once the new workers failed to boot
    assert request(served.url, "GET", "/v2/")[1]["RateLimit-Limit"] == "100000"  # the old workers serve on

    served.config.write_text(good.replace("100000/minute", "500/minute"))
    served.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: request(served.url, "GET", "/v2/")[1].get("RateLimit-Limit") == "500",
               timeout=30, what="the new configuration served")
    assert served.proc.poll() is None


def test_sighup_to_plugins_that_fail_only_when_built_keeps_the_running_workers(tmp_path, monkeypatch, regmw_serve):
    """The master's validation builds no backend: a provider hook that raises passed it, gunicorn
    stopped the old workers, the new ones failed to boot ("App failed to load") and the server stopped."""
    (tmp_path / "regmw_reload_plugin").mkdir()
    (tmp_path / "regmw_reload_plugin" / "__init__.py").write_text("")
    (tmp_path / "regmw_reload_plugin" / "boot.py").write_text(
        "from regmw import hookimpl\n\n@hookimpl\ndef regmw_cache(config, services):\n"
        "    raise RuntimeError('cache backend exploded')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    served = regmw_serve(gateway_config("http://127.0.0.1:9"), workers=1)
    good = served.config.read_text()

    served.config.write_text(good.replace("entry_points = false\n",
                                          'entry_points = false\nplugins = ["regmw_reload_plugin.boot"]\n'))
    served.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: served.proc.poll() is not None or "not reloaded" in served.log.read_text(),
               timeout=30, what="the reload's outcome")
    assert served.proc.poll() is None
    assert ("not reloaded (the running workers keep serving): start-up failed: RuntimeError: cache backend exploded"
            in served.log.read_text())
    assert request(served.url, "GET", "/-/regmw/health")[0] == 200
    directory = Path(tempfile.gettempdir()).glob(f"regmw-metrics-{served.proc.pid}-*/*.db")
    pids = {int(path.stem.rpartition("_")[2]) for path in directory}
    assert all(os.path.exists(f"/proc/{pid}") for pid in pids)  # the trial build's files are gone with it

    served.config.write_text(good.replace("100000/minute", "500/minute"))
    served.proc.send_signal(signal.SIGHUP)  # a good one after it still applies
    wait_until(lambda: request(served.url, "GET", "/v2/")[1].get("RateLimit-Limit") == "500",
               timeout=30, what="the new configuration served")


def test_a_worker_replaced_after_a_crash_builds_the_configuration_last_loaded(regmw_serve):
    """A file edited but not yet reloaded (SIGHUP) is not what a replacement worker reads: it read the
    file as it was then, failed to boot on the typo, and gunicorn stopped the whole server."""
    served = regmw_serve(gateway_config("http://127.0.0.1:9"), workers=1)
    assert request(served.url, "GET", "/v2/")[1]["RateLimit-Limit"] == "100000"
    (worker,) = wait_until(lambda: workers_of(served.proc), timeout=30, what="the worker")
    served.config.write_text(served.config.read_text().replace("100000/minute", "500/minute") + "[serve.typo]\n")

    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: served.proc.poll() is not None or workers_of(served.proc) - {worker},
               timeout=30, what="a replacement worker")
    headers = wait_until(lambda: served.proc.poll() is None and request(served.url, "GET", "/v2/")[1],
                         timeout=30, what="an answer from the replacement")
    assert headers["RateLimit-Limit"] == "100000"  # the configuration loaded at start, not the edited file


# --- metrics, health, ready, logs ------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{key}="{val}"' in head for key, val in labels.items()):
            total += float(value)
    return total


def metrics_text(served: Served) -> str:
    status, _, body = request(f"http://127.0.0.1:{served.metrics_port}", "GET", "/metrics")
    assert status == 200
    return body.decode()


def measured(url: str, requests: int, **labels: str) -> str:
    """The metrics at ``url`` once ``requests`` API requests (with ``labels``) are measured in them.

    A request is measured when the server closes its body, after the client has the last byte: the
    client can ask for the metrics before the worker that served its previous request has done that.
    """
    parts = urlsplit(url)

    def scrape() -> str | None:
        status, _, body = request(f"{parts.scheme}://{parts.netloc}", "GET", parts.path)
        assert status == 200
        text = body.decode()
        return text if metric(text, "regmw_request_duration_seconds_count", **labels) >= requests else None

    return wait_until(scrape, timeout=30, what=f"{requests} requests measured")


@pytest.mark.services
def test_metrics_of_all_workers_on_the_separate_port_not_on_the_api_port(docker_registry, regmw_serve):
    served = regmw_serve(gateway_config(docker_registry.url), metrics=True, workers=2)
    for _ in range(20):  # spread over both workers by the kernel; the total must still be 20
        assert request(served.url, "GET", "/v2/")[0] == 200
    assert request(served.url, "GET", "/v2/a/manifests/latest")[0] == 404
    text = measured(f"http://127.0.0.1:{served.metrics_port}/metrics", 21)
    assert metric(text, "regmw_request_duration_seconds_count", resource="base", method="GET", status="2xx") == 20
    assert metric(text, "regmw_request_duration_seconds_count", resource="manifests", status="4xx") == 1
    assert metric(text, "regmw_upstream_response_seconds_count", upstream="upstream") == 21
    # The API port does not answer metrics unless configured: the path goes to the upstream (404 there).
    status, _, body = request(served.url, "GET", "/-/regmw/metrics")
    assert status == 404 and b"regmw_requests_total" not in body


@pytest.mark.services
def test_metrics_on_the_api_port_only_when_configured_and_allowed(docker_registry, regmw_serve):
    config = gateway_config(docker_registry.url).replace(
        "entry_points = false\n", 'entry_points = false\nmetrics_path = "/-/regmw/metrics"\n')
    served = regmw_serve(config)  # default allow-list: loopback
    for _ in range(6):
        request(served.url, "GET", "/v2/")
    text = measured(f"{served.url}/-/regmw/metrics", 6, resource="base")  # every worker's figures, whichever worker answers
    assert metric(text, "regmw_request_duration_seconds_count", resource="base") == 6
    elsewhere = regmw_serve(config, serve_extra='metrics_allow = ["10.0.0.0/8"]\n')
    status, _, body = request(elsewhere.url, "GET", "/-/regmw/metrics")
    assert status == 403 and json.loads(body)["errors"][0]["code"] == "DENIED"


@pytest.mark.services
def test_health_ready_and_a_dependency_down(tmp_path, docker_registry, regmw_serve, redis_server):
    redis_proc, redis_url = redis_server
    config = gateway_config(docker_registry.url).replace(
        "entry_points = false\n", 'entry_points = false\nplugins = ["redis"]\n') + f'[redis]\nurl = "{redis_url}"\n'
    served = regmw_serve(config)
    status, _, body = request(served.url, "GET", "/-/regmw/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, _, body = request(served.url, "GET", "/-/regmw/ready")
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "ready"
    assert {"cache", "locks", "upstream"} <= set(answer["checks"]) and all(c["ok"] for c in answer["checks"].values())

    stop(redis_proc)
    status, _, body = request(served.url, "GET", "/-/regmw/ready")
    answer = json.loads(body)
    assert status == 503 and answer["status"] == "not ready"
    assert not answer["checks"]["cache"]["ok"] and "Connection" in answer["checks"]["cache"]["error"]
    assert answer["checks"]["upstream"]["ok"]

    stop(docker_registry.proc)
    answer = json.loads(request(served.url, "GET", "/-/regmw/ready")[2])
    assert not answer["checks"]["upstream"]["ok"]
    assert request(served.url, "GET", "/-/regmw/health")[0] == 200  # alive all the same


@pytest.mark.services
def test_json_access_log_line(docker_registry, regmw_serve):
    served = regmw_serve(gateway_config(docker_registry.url))
    status, headers, _ = request(served.url, "GET", f"/v2/{REPO}/tags/list", headers={"X-Request-Id": "req-42"})
    assert status == 404 and headers["X-Request-Id"] == "req-42"
    status, headers, _ = request(served.url, "GET", "/v2/Bad..Name/tags/list")
    assert status == 400
    generated = headers["X-Request-Id"]
    deadline = time.monotonic() + 10
    while len(served.log_lines()) < 2:  # each worker writes its line after the response: poll for it
        assert time.monotonic() < deadline
        time.sleep(0.05)
    lines = {line["request_id"]: line for line in served.log_lines()}
    line = lines["req-42"]
    assert line["method"] == "GET" and line["path"] == f"/v2/{REPO}/tags/list" and line["status"] == 404
    assert line["repository"] == REPO and line["resource"] == "tags" and line["client"] == "127.0.0.1"
    assert line["ratelimit_remaining"] == 99999 and line["refusal"] is None and line["migration_path"] is None
    assert line["duration_ms"] > 0 and line["ts"].endswith("Z")
    assert len(generated) == 32 and lines[generated]["refusal"] == "invalid" and lines[generated]["status"] == 400


@pytest.mark.services
def test_metrics_directory_is_removed_at_exit_and_stale_ones_at_start(tmp_path, docker_registry, regmw_serve):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a PID no process has any more
    stale = Path(tempfile.gettempdir()) / f"regmw-metrics-{gone.pid}-test"
    stale.mkdir()
    served = regmw_serve(gateway_config(docker_registry.url))
    assert not stale.exists()
    environ = dict(item.split("=", 1) for item in
                   Path(f"/proc/{served.proc.pid}/environ").read_text().split("\0") if "=" in item)
    own = Path(environ["PROMETHEUS_MULTIPROC_DIR"])
    assert own.is_dir() and own.name.startswith(f"regmw-metrics-{served.proc.pid}-")
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=30) == 0
    assert not own.exists()


#: `regmw serve` (regmw.server.main) whose workers, once forked, wait for the file named by
#: REGMW_TEST_GO before they go on to install their signal handlers: the window in which a
#: SIGTERM from the master used to be lost, held open until the test has sent one.
HELD_BOOT = """
import os, sys, time
from gunicorn import util

seed = util.seed


def held_seed():  # Worker.init_process calls it just before init_signals
    deadline = time.monotonic() + 60
    while not os.path.exists(os.environ["REGMW_TEST_GO"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    seed()


util.seed = held_seed
from regmw.server import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_sigterm_while_the_workers_boot_stops_the_server_at_once(tmp_path):
    """A SIGTERM the master passes on while a worker boots (stopped right after start) stops that
    worker too; it was lost, and the worker served on until ``graceful_timeout`` killed it."""
    config = tmp_path / "regmw.toml"
    config.write_text("[serve]\nworkers = 2\ngraceful_timeout = 100\n" + gateway_config("http://127.0.0.1:9"))
    script, log, go = tmp_path / "held_boot.py", tmp_path / "serve.log", tmp_path / "go"
    script.write_text(HELD_BOOT)
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(script), "--config", str(config), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "REGMW_CONFIG": "", "REGMW_TEST_GO": str(go)})
    try:
        wait_for_port(port, proc=proc, timeout=30)
        wait_until(lambda: log.read_text().count("Booting worker") == 2, timeout=30, what="both workers forked")
        proc.send_signal(signal.SIGTERM)
        # the master refuses connections once it stops (Arbiter.stop), just before it signals the workers
        wait_until(lambda: connection_refused(port), timeout=30, what="the master stopping")
        go.touch()  # the workers go on to install their handlers
        assert proc.wait(timeout=30) == 0, log.read_text()  # not after graceful_timeout (100 s)
    finally:
        stop(proc)


# --- what gunicorn refuses before the application sees a request ---------------------


REFUSED_BY_GUNICORN = [
    (b"get /v2/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # lowercase method
    (b"PATCH /v2/a/b/blobs/uploads/x HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\nhello", 400),
    (b"PUT /v2/a/b/manifests/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello", 400),
    # just past gunicorn's limits (4094, 8190): all of it is read, so the close sends no RST before the answer
    (b"GET /v2/" + b"a" * 4100 + b"/tags/list HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"a" * 8200 + b"\r\n\r\n", 431),
    (b"PUT /v2/a/b/manifests/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501),
]


def test_what_gunicorn_refuses_is_answered_with_an_oci_body_not_html_and_logged(regmw_serve):
    """An OCI body, and (as for the middleware's own refusals) an access log line and a refusal count."""
    served = regmw_serve(gateway_config("http://127.0.0.1:9"), metrics=True, workers=1)  # never reached
    before = metric(metrics_text(served), "regmw_refusals_total", reason="invalid")
    for raw, status in REFUSED_BY_GUNICORN:
        with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
            sock.sendall(raw)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status), (raw[:40], head)
        assert status == 400 or b" Bad Request\r\n" not in head, head  # the status's own reason phrase
        assert b"content-type: application/json" in head.lower(), (raw[:40], head)
        assert json.loads(body)["errors"][0]["code"] == "UNKNOWN", (raw[:40], body)
    wait_until(lambda: len(served.log_lines()) == len(REFUSED_BY_GUNICORN), timeout=10, what="the access log lines")
    lines = served.log_lines()
    assert [line["status"] for line in lines] == [status for _, status in REFUSED_BY_GUNICORN]
    assert all(line["refusal"] == "invalid" and line["client"] == "127.0.0.1" for line in lines)
    wait_until(lambda: metric(metrics_text(served), "regmw_refusals_total", reason="invalid")
               == before + len(REFUSED_BY_GUNICORN), timeout=10, what="the refusals counted")


# --- what gunicorn lets through but the gateway must not forward ----------------------

UPLOAD = b"POST /v2/group/project/blobs/uploads/ HTTP/1.1\r\nConnection: close\r\n"
REFUSED_BY_THE_GATEWAY = [
    # gunicorn de-chunks and accepts ``gzip``: forwarded as plain chunked, docker-registry took the coded bytes
    (UPLOAD + b"Host: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 501, "UNSUPPORTED"),
    # an authority-form target went upstream as ``CONNECT 443`` (docker-registry: a 301 to ``//443/``)
    (b"CONNECT evil.example:443 HTTP/1.1\r\nConnection: close\r\nHost: evil.example:443\r\n\r\n", 405, "UNSUPPORTED"),
    # forwarded as the client's Host: docker-registry's plain-text ``400 Bad Request: malformed Host header``
    (UPLOAD + b"Host: evil.example/x?\r\nContent-Length: 0\r\n\r\n", 400, "UNKNOWN"),
    (b"GET /v2/ HTTP/1.1\r\nConnection: close\r\nHost: a b\r\n\r\n", 400, "UNKNOWN"),
    # RFC 9112 3.2's MUST; forwarded, it went upstream with the upstream's own Host and was answered 200
    (b"GET /v2/ HTTP/1.1\r\nConnection: close\r\n\r\n", 400, "UNKNOWN"),
    # 2^64 + 3: docker-registry's plain-text 400 once the gateway streamed, after the client's whole body or
    # never (this one sends no more); a parser that wraps reads 3 and takes the rest as a request of its own
    (UPLOAD + b"Host: x\r\nContent-Length: 18446744073709551619\r\n\r\nabc", 400, "UNKNOWN"),
]


@pytest.mark.services
@pytest.mark.parametrize(("raw", "status", "code"), REFUSED_BY_THE_GATEWAY,
                         ids=["gzip-chunked", "connect", "host-with-path", "host-with-space", "no-host", "length-past-int64"])
def test_what_the_gateway_cannot_forward_as_sent_is_answered_by_regmw(docker_registry, regmw_serve, raw, status, code):
    """A request gunicorn accepts but the upstream would read otherwise is answered by regmw with an OCI
    body, and nothing reaches docker-registry (no upload started)."""
    served = regmw_serve(gateway_config(docker_registry.url), workers=1)
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        sock.sendall(raw)  # the write side stays open: a body cut short would be refused as such
        answer = answer_or_close(sock, within=30)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), head
    assert b"content-type: application/json" in head.lower(), head
    assert json.loads(body)["errors"][0]["code"] == code, body
    if docker_registry.root is not None:  # a registry of this run's own
        uploads = docker_registry.root / "docker/registry/v2/repositories/group/project/_uploads"
        assert not uploads.exists() or not any(uploads.iterdir())
    # a good request right after is forwarded as usual
    assert request(served.url, "POST", "/v2/group/project/blobs/uploads/")[0] == 202


@pytest.mark.services
def test_an_absolute_form_target_without_a_path_is_forwarded_in_origin_form(docker_registry, regmw_serve):
    """``GET http://host?x`` has an empty path, which gunicorn passes on as such: forwarded as ``?x`` it was
    no request line docker-registry takes (a plain-text 400); as ``/?x`` it answers as it answers ``/``."""
    served = regmw_serve(gateway_config(docker_registry.url), workers=1)
    answers = []
    for target in (b"/?x", b"http://registry.example?x"):
        with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
            sock.sendall(b"GET %b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % target)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        answers.append(answer.split(b"\r\n", 1)[0])
    assert answers[1] == answers[0] == b"HTTP/1.1 200 OK", answers


# --- clients that stall mid-request ------------------------------------------------


def answer_or_close(sock: socket.socket, within: float) -> bytes:
    """What the server sends on ``sock`` until it closes it; fails if it still holds it after ``within`` s."""
    answer = b""
    sock.settimeout(within)
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except TimeoutError:
        pytest.fail(f"the server still holds a stalled connection after {within}s (answered {answer[:60]!r})")
    except ConnectionResetError:
        pass
    return answer


def test_a_stalled_client_holds_a_thread_only_for_client_timeout(regmw_serve):
    # An upstream that accepts (into its backlog) and never answers: the gateway is left reading the
    # client's body. Without a limit, eight stalled clients held all eight threads forever.
    with socket.socket() as sink:
        sink.bind(("127.0.0.1", 0))
        sink.listen(64)
        served = regmw_serve(gateway_config(f"http://127.0.0.1:{sink.getsockname()[1]}"), workers=1,
                             serve_extra="client_timeout = 2\n")
        stalled = []
        for n in range(8):  # [serve] threads = 8: every thread of the one worker
            sock = socket.create_connection(("127.0.0.1", served.port), timeout=30)
            if n % 2:  # a body short of its Content-Length
                sock.sendall(b"PUT /v2/a/b/manifests/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            else:  # half a request head
                sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Half: a")
            stalled.append(sock)
        try:
            for n, sock in enumerate(stalled):
                answer = answer_or_close(sock, within=20)
                if n % 2:
                    assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
                    error = json.loads(answer.partition(b"\r\n\r\n")[2])["errors"][0]
                    assert error["code"] == "UNKNOWN" and "stalled" in error["message"], error
                else:
                    assert answer == b""  # a head never finished: nothing to answer, the connection closes
            status, _, _ = request(served.url, "GET", "/-/regmw/health")  # threads are free again
            assert status == 200
            # gunicorn's "Socket error processing request." with a traceback, per stalled head: one line each
            wait_until(lambda: served.log.read_text().count("then nothing for [serve] client_timeout") == 4,
                       timeout=10, what="a line per stalled head")
            assert "Traceback" not in served.log.read_text()
        finally:
            for sock in stalled:
                sock.close()


def test_a_client_that_stops_reading_a_sendfile_pull_holds_its_thread_only_for_client_timeout(tmp_path, regmw_serve):
    """The bundled registry's blob pull goes out with sendfile, whose wait socket.sendfile never limits."""
    served = regmw_serve("", workers=1, serve_extra="client_timeout = 1\n",
                         args=("--registry-root", str(tmp_path / "registry")))
    size = 32 * 1024 * 1024
    digest = push_blob(served.url, [os.urandom(1024 * 1024)] * 32)
    status, _, body = request(served.url, "GET", f"/v2/{REPO}/blobs/{digest}")  # a client that reads: all of it
    assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == digest
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the server's sends block at once
        sock.connect(("127.0.0.1", served.port))
        sock.sendall(f"GET /v2/{REPO}/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        # The pull is finished (its access log line written) once the server gives up on the stalled client.
        wait_until(lambda: sum(line["path"] == f"/v2/{REPO}/blobs/{digest}" for line in served.log_lines()) == 2,
                   timeout=30, what="the server giving up on a client that reads nothing")
        answer = answer_or_close(sock, within=30)
    assert answer.startswith(b"HTTP/1.1 200 ") and len(answer) < size  # cut short, not sent to the end
