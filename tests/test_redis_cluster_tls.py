"""TLS for real: ``rediss://`` and ``rediss+cluster://`` against redis-server on ``--tls-port`` only.

The test makes a self-signed certificate for IP 127.0.0.1 (``openssl req
-x509 ... -addext subjectAltName=IP:127.0.0.1``) and trusts it through
``[redis] tls_ca_file``: the certificate is verified (hostname included).
Another CA is refused with one clear line, at first use (``ping``, ``regmw check-config --connect``, the
start-up warning, a request's fail-open counter); start-up itself does not
fail, as for any Redis outage.
"""
from __future__ import annotations

import logging
import subprocess

import pytest
import redis
from werkzeug.test import Client

from regmw import build, repository_key
from regmw.cli import main as cli
from regmw_redis.connection import ROUND_TRIPS
from tests.servers._util import free_port, need_binary, stop
from tests.servers.redis_apps import make_middleware
from tests.servers.redis_cluster import make_certificate, tls_args, wait_for_tls

MANIFEST = "/v2/team/app/manifests/latest"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """(url, CA file, another CA file) of a TLS-only redis-server."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = make_certificate(directory)
    other, _ = make_certificate(directory, "other")
    port = free_port()
    proc = subprocess.Popen(
        [need_binary("redis-server"), *tls_args(cert, key, port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_tls(port, cert, proc)
        yield f"rediss://127.0.0.1:{port}/0", str(cert), str(other)
    finally:
        stop(proc)


def _runtime(url: str, ca: str, **redis_section):
    return build({"regmw": {"plugins": ["redis"], "entry_points": False},
                  "redis": {"url": url, "tls_ca_file": ca, **redis_section}}, environ={})


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


def test_rediss_single_node_verified_and_wrong_ca_refused(tls_redis, caplog):
    url, ca, other = tls_redis
    runtime = _runtime(url, ca)
    runtime.services.redis.ping()
    cache = runtime.services.cache
    cache.set(repository_key("team/app", "class"), b"old")
    assert cache.get(repository_key("team/app", "class")) == b"old"
    client = Client(make_middleware(url, redis={"tls_ca_file": ca},
                                    ratelimit={"rules": [{"by": "client", "limit": "2/hour"}]}))
    assert [client.get(MANIFEST).status_code for _ in range(3)] == [200, 200, 429]

    with caplog.at_level(logging.WARNING, logger="regmw.redis"):
        wrong = _runtime(url, other)  # start-up does not fail: it logs one line and goes on
    assert any("certificate verify failed" in record.getMessage() for record in caplog.records)
    with pytest.raises(redis.ConnectionError) as caught:
        wrong.services.redis.ping()
    assert "certificate verify failed" in _one_line(caught.value)


def test_rediss_cluster_verified_and_wrong_ca_refused(redis_cluster_tls, tmp_path, caplog, capsys):
    group = redis_cluster_tls
    ca = str(group.tls[0])
    runtime = _runtime(group.url, ca, namespace="tls")
    runtime.services.redis.ping()  # every master, over TLS
    middleware = make_middleware(group.url, redis={"tls_ca_file": ca, "namespace": "tls"},
                                 ratelimit={"rules": [{"by": "client", "limit": "2/hour"},
                                                      {"by": "repository", "limit": "10/hour"}]})
    client = Client(middleware)
    assert [client.get(MANIFEST).status_code for _ in range(3)] == [200, 200, 429]
    before = ROUND_TRIPS._value.get()
    other_client = {"REMOTE_ADDR": "10.1.1.1"}
    assert client.put("/v2/team/other/manifests/latest", data=b"{}", environ_overrides=other_client).status_code == 201
    # one script per slot group, over TLS too, and the write's confirmation ([readonly] confirm_writes)
    assert 2 <= ROUND_TRIPS._value.get() - before <= 3
    lease = middleware.services.locks.set_read_only("team/other", 30, "tls-test")
    refused = client.put("/v2/team/other/manifests/latest", data=b"{}", environ_overrides=other_client)
    assert lease is not None and refused.status_code == 503

    other, _ = make_certificate(tmp_path, "other")
    with caplog.at_level(logging.WARNING, logger="regmw.redis"):
        wrong = _runtime(group.url, str(other))
    line = f"TLS certificate not trusted by {other} ([redis] tls_ca_file)"
    assert any(line in record.getMessage() for record in caplog.records)
    with pytest.raises(redis.ConnectionError) as caught:
        wrong.services.redis.ping()
    assert line in _one_line(caught.value)
    # and `regmw check-config --connect` (start-up with connections) refuses it with that line
    config = tmp_path / "regmw.toml"
    config.write_text(f'[regmw]\nplugins = ["redis"]\nentry_points = false\n'
                      f'[redis]\nurl = "{group.url}"\ntls_ca_file = "{other}"\n')
    assert cli(["check-config", "--connect", str(config)]) == 1
    assert line in capsys.readouterr().err.strip().splitlines()[-1]
