"""Pure parts of the notifications plugin: signatures, the SSRF guard, retry schedule, config checks."""
from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from regmw import ConfigError, build
from regmw.errors import SlotUnavailable
from regmw_notify.deliver import Outcome, Poster
from regmw_notify.endpoints import Endpoint, check_address, parse_endpoints
from regmw_notify.events import action_for, envelope_raw
from regmw_notify.signing import Signer
from regmw_notify.worker import Worker

OLD, NEW = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_" + "c2VjcmV0LW51bWJlci10d28tZm9yLXJvdGF0aW9u"


def test_rotation_signs_with_every_secret_so_either_verifies():
    body = envelope_raw([b'{"id":"e1","action":"push"}'])
    headers = Signer([OLD, NEW]).headers("e1", body, now=time.time())
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (OLD, NEW):
        assert Webhook(secret).verify(body, headers)["events"][0]["id"] == "e1"
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "b3RoZXItc2VjcmV0LW5vdC1jb25maWd1cmVk").verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(OLD).verify(body.replace(b"push", b"pull"), headers)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x", "http://localhost:8080/", "http://10.1.2.3/", "http://192.168.0.1/",
    "http://169.254.169.254/latest/meta-data", "http://[::1]/", "http://[fe80::1]/", "http://0.0.0.0/",
    "http://100.100.100.200/latest/meta-data",  # shared address space (100.64.0.0/10): a cloud's metadata service
    "http://[::ffff:169.254.169.254]/", "http://[2002:a9fe:a9fe::]/",  # IPv4 inside IPv6 (mapped, 6to4)
    "http://localhost./",
])
def test_internal_addresses_are_refused_unless_allowed(url):
    with pytest.raises(ValueError, match="internal address"):
        check_address(url)
    check_address(url, [ipaddress.ip_network(net) for net in ("0.0.0.0/0", "::/0")])


def test_public_address_passes_the_guard():
    check_address("https://93.184.215.14/hook")
    check_address("https://[2606:4700::1111]/hook")


def test_names_are_resolved_and_checked_before_each_post_and_an_unresolvable_one_is_refused(monkeypatch):
    """Configuration checks stay offline (names pass); every POST resolves the name first, and a name that
    does not resolve is refused too (fail closed: the connection's own look-up could succeed a moment later)."""
    real = socket.getaddrinfo

    def resolver(host, *args, **kwargs):
        if host == "hook.example.com":  # re-pointed at an internal (loopback: no traffic leaves) address
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", 0))]
        if host == "gone.example.com":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    allowed = [ipaddress.ip_network("127.0.0.1/32")]
    parse_endpoints([{"name": "e", "url": "http://hook.example.com:9/x"}], allowed)
    with pytest.raises(ValueError, match="internal address"):
        check_address("http://hook.example.com/", allowed)
    with pytest.raises(ValueError, match="could not be resolved"):
        check_address("http://gone.example.com/", allowed)
    for url, why in (("http://hook.example.com:9/x", "internal address"), ("http://gone.example.com:9/x", "resolved")):
        outcome = Poster(Endpoint("e", url), allowed).post("e1", [b'{"id":"e1"}'])
        assert outcome.result == "failed" and why in outcome.detail


def test_retry_schedule_repeats_its_last_step_within_jitter():
    endpoint = Endpoint("e", "http://x", retry_schedule=(0, 5, 300), jitter=0.2)
    assert endpoint.delay(1, 0.5) == 5 and endpoint.delay(2, 0.5) == 300 and endpoint.delay(9, 0.5) == 300
    assert endpoint.delay(1, 0.0) == pytest.approx(4.0) and endpoint.delay(1, 0.999999) == pytest.approx(6.0)


def test_actions_by_request():
    assert action_for("PUT", "manifests", 201, "") == "push"
    assert action_for("PUT", "manifests", 400, "") is None
    assert action_for("GET", "blobs", 200, "", pulls=False) is None
    assert action_for("POST", "uploads", 202, "") is None  # an upload starts: nothing yet
    assert action_for("POST", "uploads", 201, "mount=sha256:a&from=x/y") == "mount"
    assert action_for("PUT", "uploads", 201, "digest=sha256:a") == "push"
    assert action_for("HEAD", "manifests", 200, "") is None


@pytest.mark.parametrize("table, message", [
    ({"name": "a", "url": "http://10.0.0.1/"}, "internal address"),
    ({"name": "a", "url": "ftp://example.com/"}, "http:// or https://"),
    ({"name": "a", "url": "https://example.com/", "secrets": [""]}, "not a Standard Webhooks secret"),
    ({"name": "a", "url": "https://example.com/", "colour": "red"}, "unknown key"),
    ({"name": "a:b", "url": "https://example.com/"}, "name"),
    # a lone string instead of a list: a filter of its characters would let nothing through, silently
    ({"name": "a", "url": "https://example.com/", "actions": "push"}, r"actions: a list of strings"),
    ({"name": "a", "url": "https://example.com/", "repositories": "team/*"}, r"repositories: a list of strings"),
    ({"name": "a", "url": "https://example.com/", "media_types": "application/json"}, r"media_types: a list"),
    ({"name": "a", "url": "https://example.com/", "secrets": OLD}, r"secrets: a list of strings"),
    ({"name": "a", "url": "https://example.com/", "headers": "X-A: b"}, r"headers: a table"),
    ({"name": "a", "url": "https://example.com/", "timeout": 0}, r"timeout: seconds, more than 0"),
    ({"name": "a", "url": "https://example.com/", "timeout": "5"}, r"timeout: seconds"),
    ({"name": "a", "url": "https://example.com/", "jitter": 5}, r"jitter: a fraction"),
    ({"name": "a", "url": "https://example.com/", "max_age": -1}, r"max_age: seconds"),
    ({"name": "a", "url": "https://example.com/", "retry_schedule": "5"}, r"retry_schedule: a non-empty list"),
    ({"name": "a", "url": "https://example.com/", "batch_max": 2.5}, r"batch_max: an integer"),
    ({"name": "a", "url": "https://example.com/", "headers": {"Webhook-Signature": "v1,x"}}, "cannot be set"),
])
def test_bad_endpoint_tables_are_refused_at_validation(table, message, tmp_path):
    config = {"regmw": {"plugins": ["notifications"], "entry_points": False},
              "notifications": {"endpoints": [table], "spool_dir": str(tmp_path)}}
    with pytest.raises(ConfigError, match=message):
        build(config, environ={})


def test_a_wait_within_the_socket_timeout_or_without_wait_replicas_is_accepted(tmp_path):
    """The other side of test_check_config's "wait-outlasting-the-socket" case."""
    config = {"regmw": {"plugins": ["redis", "notifications"], "entry_points": False},
              "redis": {"url": "redis://127.0.0.1:1", "socket_timeout": 0.25},
              "notifications": {"wait_replicas": 1, "wait_timeout": 0.2, "spool_dir": str(tmp_path)}}
    build(config, environ={})
    config["notifications"].update(wait_replicas=0, wait_timeout=5.0)  # no WAIT: its timeout does not matter
    build(config, environ={})


def test_endpoint_names_are_unique():
    with pytest.raises(ValueError, match="unique"):
        parse_endpoints([{"name": "a", "url": "https://example.com/"}] * 2)


class _Slots:
    """``cluster_slot`` over a set of free shards: a free one is taken (held until released), others refused."""

    def __init__(self, free: set[int]) -> None:
        self.free = free

    @contextlib.contextmanager
    def cluster_slot(self, name: str, max_holders: int, ttl: float):
        shard = int(name.rsplit("-", 1)[1])
        if shard not in self.free:
            raise SlotUnavailable(name)
        self.free.discard(shard)
        yield types.SimpleNamespace(token=1, lost=None)


class _HoldingWorker(Worker):
    """A Worker whose held shards deliver nothing: they just stay held until ``stop``."""

    def _deliver(self, shard, lease, stop):
        stop.wait()


def test_a_worker_with_one_spare_place_reaches_the_one_free_shard():
    """3 of 4 places held; shard 7 frees up (a failover): the next round takes it, wherever the rotation starts.

    (Trying only the first unheld shard of each round, with a start that moves
    by max_shards, never reached shard 7: 8 shards, max 4, the start went 0, 4, 0, 4...)
    """
    slots = _Slots({0, 2, 3})
    worker = _HoldingWorker(types.SimpleNamespace(shards=8), slots, [], lease_ttl=3.0, max_shards=4)
    stop = threading.Event()
    try:
        worker._take_free_shards(stop)
        assert worker.held() == [0, 2, 3]
        slots.free.add(7)
        worker._take_free_shards(stop)
        assert worker.held() == [0, 2, 3, 7]
    finally:
        stop.set()


@pytest.mark.parametrize("dribble", [b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n", b""])
def test_the_endpoint_timeout_bounds_the_whole_post_not_each_read(dribble):
    """A receiver answering a byte at a time (the body, or the status line and headers themselves) fails the
    POST at ``timeout``: each read arriving within it must not let the POST (and its lane) last indefinitely."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve():
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            head = dribble or b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + b"X-Slow: y\r\n" * 20 + b"\r\n"
            if dribble:
                connection.sendall(head)
                head = b"x" * 40
            for byte in head:  # a byte every 0.1 s: each read is well within the timeout, the whole is not
                if done.wait(0.1):
                    return
                with contextlib.suppress(OSError):
                    connection.sendall(bytes([byte]))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    endpoint = parse_endpoints([{"name": "slow", "url": f"http://127.0.0.1:{listener.getsockname()[1]}/h",
                                 "timeout": 0.5}], [ipaddress.ip_network("127.0.0.0/8")])[0]
    try:
        started = time.monotonic()
        outcome = Poster(endpoint, [ipaddress.ip_network("127.0.0.0/8")]).post("e1", [b'{"id":"e1"}'])
        elapsed = time.monotonic() - started
    finally:
        done.set()
        thread.join(10)
        listener.close()
    assert outcome.result == "failed" and "timed out" in outcome.detail, outcome
    assert elapsed < 1.5, elapsed


def test_retry_after_is_read_as_seconds_or_an_http_date():
    from regmw_notify.deliver import retry_after

    assert retry_after("120") == 120.0
    assert retry_after("Fri, 27 Nov 2026 07:00:30 GMT", now=1795762800.0) == 30.0  # 07:00:00 + 30 s
    assert retry_after("Fri, 27 Nov 2026 06:00:00 GMT", now=1795762800.0) == 0.0  # in the past
    assert retry_after(None) == retry_after("") == retry_after("soon") == retry_after("-5") == 0.0
    # str.isdigit() says yes to these (a receiver's byte 0xB2 is "²"), float() then raised: every lane stopped
    assert retry_after("\xb2") == retry_after("\u0663") == retry_after("1.5") == 0.0


def test_an_answer_body_is_read_only_up_to_a_bound_and_a_longer_one_closes_its_connection():
    """A receiver answering 200 with an endless body: preloaded, the body was held in memory for the whole
    timeout (1.2 GB in 2 s on loopback) and the POST failed at it. The status is the outcome: delivered at
    once, at most MAX_ANSWER read, that connection closed, and the next POST works on a new one."""
    from regmw_notify.deliver import MAX_ANSWER

    listener = socket.create_server(("127.0.0.1", 0))
    done, connections = threading.Event(), []

    def serve():
        for answer in (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 40) + b"x" * (4 * MAX_ANSWER),
                       b"HTTP/1.1 204 No Content\r\n\r\n"):
            connection, _ = listener.accept()
            connections.append(connection)
            connection.recv(65536)
            connection.sendall(answer)
        done.wait(10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    endpoint = parse_endpoints([{"name": "big", "url": f"http://127.0.0.1:{listener.getsockname()[1]}/h",
                                 "timeout": 2}], [ipaddress.ip_network("127.0.0.0/8")])[0]
    poster = Poster(endpoint, [ipaddress.ip_network("127.0.0.0/8")])
    try:
        started = time.monotonic()
        first = poster.post("e1", [b'{"id":"e1"}'])
        elapsed = time.monotonic() - started
        second = poster.post("e2", [b'{"id":"e2"}'])
    finally:
        done.set()
        thread.join(10)
        listener.close()
        for connection in connections:
            connection.close()
    assert first.result == "delivered" and elapsed < 1.0, (first, elapsed)
    assert second.result == "delivered" and len(connections) == 2


def post_to_raw_receiver(serve: Callable[[socket.socket], None], **table: Any) -> Outcome:
    """POST one event to the endpoint ``table`` at a one-connection raw receiver running ``serve(connection)``."""
    listener = socket.create_server(("127.0.0.1", 0))

    def accept():
        connection, _ = listener.accept()
        with connection:
            serve(connection)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    loopback = [ipaddress.ip_network("127.0.0.0/8")]
    endpoint = parse_endpoints([{"name": "raw", "url": f"http://127.0.0.1:{listener.getsockname()[1]}/h", **table}],
                               loopback)[0]
    try:
        return Poster(endpoint, loopback).post("e1", [b'{"id":"e1"}'])
    finally:
        thread.join(10)
        listener.close()


def test_an_endpoints_content_type_replaces_ours_whatever_its_case():
    """``headers = {"content-type" = "application/json"}``: one Content-Type is sent, the endpoint's, not two."""
    heads = []

    def serve(connection):
        data = b""
        while b"\r\n\r\n" not in data:
            data += connection.recv(65536)
        heads.append(data.split(b"\r\n\r\n")[0].decode())
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    outcome = post_to_raw_receiver(serve, secrets=[OLD], headers={"content-type": "application/json"})
    assert outcome.result == "delivered"
    types = [line for line in heads[0].split("\r\n")[1:] if line.lower().startswith("content-type:")]
    assert [value.split(":", 1)[1].strip() for value in types] == ["application/json"], heads[0]


@pytest.mark.parametrize("answer", [b"HTTP/1.1 200 OK\r\nConte", b"HTTP/1.1 200 OK\r\nX-A: 1\r\n"],
                         ids=["mid-line", "before-the-empty-line"])
def test_a_2xx_whose_head_the_receiver_hung_up_in_is_no_delivery(answer):
    """http.client took such a head for a whole one (a 200 with an empty body): a receiver that died while
    answering had its events acknowledged. At least once means it gets them again."""

    def serve(connection):
        connection.recv(65536)
        connection.sendall(answer)

    outcome = post_to_raw_receiver(serve)
    assert outcome.result == "failed", outcome
