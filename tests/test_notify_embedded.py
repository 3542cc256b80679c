"""Notifications without Redis: the SQLite spool is the queue, delivered by a thread inside the server."""
from __future__ import annotations

import pytest
from werkzeug.test import Client

from regmw import RegistryMiddleware
from regmw.metrics import REGISTRY
from regmw.cli import main

from .servers.redis_apps import registry_app
from .servers.webhook_receiver import SECRET
from .test_notify_delivery import wait_until


def embedded_config(receiver, spool_dir, **endpoint) -> dict:
    table = {"name": "hook", "url": receiver.url, "secrets": [SECRET], "timeout": 0.5,
             "retry_schedule": [0, 0.02, 0.05]}
    table.update(endpoint)
    return {
        "regmw": {"plugins": ["notifications"], "entry_points": False},
        "notifications": {"endpoints": [table], "allowed_networks": ["127.0.0.0/8"], "spool_dir": str(spool_dir)},
    }


@pytest.fixture
def embedded(webhook_receiver, tmp_path):
    made = []

    def make(**endpoint):
        receiver = webhook_receiver()
        middleware = RegistryMiddleware(registry_app, embedded_config(receiver, tmp_path / "spool", **endpoint),
                                        environ={})
        made.append(middleware)
        return receiver, Client(middleware), middleware

    yield make
    for middleware in made:
        middleware.services.events.close()


def delivered_to(endpoint: str) -> float:
    return REGISTRY.get_sample_value("regmw_notify_delivered_events_total", {"endpoint": endpoint}) or 0.0


def test_pushes_pulls_and_deletes_are_delivered_in_order_without_redis(embedded):
    before = delivered_to("hook")  # the registry is the process's: other tests' lanes counted there too
    receiver, client, _ = embedded()
    for tag in range(1, 6):
        assert client.put(f"/v2/team/app/manifests/v{tag}", data=b"{}",
                          headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}).status_code == 201
    assert client.get("/v2/team/app/manifests/v5").status_code == 200
    digest = "sha256:" + "a" * 64
    assert client.put(f"/v2/team/app/blobs/uploads/u1?digest={digest}", data=b"x").status_code == 201
    assert client.post(f"/v2/team/other/blobs/uploads/?mount={digest}&from=team/app").status_code == 201
    assert client.delete(f"/v2/team/app/manifests/{digest}").status_code == 200
    assert client.patch("/v2/team/app/blobs/uploads/u2", data=b"x").status_code == 200  # no event
    assert client.get("/v2/team/app/tags/list").status_code == 200  # no event
    wait_until(lambda: receiver.count() >= 9, 10, "nine events")
    events = receiver.snapshot()
    assert [event["action"] for event in events] == ["push"] * 5 + ["pull", "push", "mount", "delete"]
    assert [event["target"]["tag"] for event in events[:5]] == [f"v{tag}" for tag in range(1, 6)]
    assert events[6]["target"]["digest"] == digest and events[6]["target"]["mediaType"] == "application/octet-stream"
    assert events[7]["target"]["fromRepository"] == "team/app" and events[7]["target"]["repository"] == "team/other"
    assert all(set(event) == {"id", "timestamp", "action", "target", "request", "actor", "source"} for event in events)
    assert receiver.bad_signatures == 0
    # The receiver records a POST's events before it answers; the lane counts them once it has the 2xx
    # (and has acked them): wait for that, it may come after the receiver's count.
    wait_until(lambda: delivered_to("hook") >= before + 9, 10, "nine deliveries counted")


def test_filters_keep_unwanted_events_out(embedded):
    receiver, client, _ = embedded(actions=["push"], repositories=["team/*"])
    client.put("/v2/team/app/manifests/v1", data=b"{}")
    client.get("/v2/team/app/manifests/v1")  # a pull: filtered out
    client.put("/v2/other/app/manifests/v1", data=b"{}")  # another repository pattern: filtered out
    client.put("/v2/team/app/manifests/v2", data=b"{}")
    wait_until(lambda: receiver.count() >= 2, 10, "two events")
    assert [(e["action"], e["target"]["repository"], e["target"]["tag"]) for e in receiver.snapshot()] == [
        ("push", "team/app", "v1"), ("push", "team/app", "v2")]


def test_a_redirect_is_a_failure_and_410_disables_the_endpoint_until_resumed(embedded, tmp_path, capsys):
    receiver, client, middleware = embedded()
    receiver.status = 302
    client.put("/v2/team/app/manifests/v1", data=b"{}")
    wait_until(lambda: receiver.refused >= 3, 10, "retries after 302s")
    assert receiver.count() == 0
    receiver.status = 410
    wait_until(lambda: middleware.services.events.spool.state("hook")[1].startswith("410"), 10, "the 410")
    refused = receiver.refused
    receiver.status = 200
    client.put("/v2/team/app/manifests/v2", data=b"{}")
    assert receiver.count() == 0 and receiver.refused == refused  # disabled: nothing is sent
    config = tmp_path / "regmw.toml"
    config.write_text(f'[regmw]\nplugins = ["notifications"]\n[notifications]\nspool_dir = "{tmp_path / "spool"}"\n'
                      f'allowed_networks = ["127.0.0.0/8"]\nendpoints = [{{name = "hook", url = "{receiver.url}"}}]\n')
    assert main(["-c", str(config), "notifications", "resume", "hook"]) == 0
    assert "hook resumed" in capsys.readouterr().out
    wait_until(lambda: receiver.count() >= 2, 10, "both events after resume")
    assert [event["target"]["tag"] for event in receiver.snapshot()] == ["v1", "v2"]


def test_dead_letter_commands_touch_only_the_named_endpoints_letters_and_refuse_unknown_names(tmp_path, capsys):
    """Letters of the embedded queue are numbered across endpoints: ``drop b 1`` must not drop a's letter 1,
    and a letter name that is malformed or not the endpoint's is an error (exit 2), not "0 dropped"."""
    from regmw_notify.spool import queue_spool
    from regmw_notify.spool import Row

    spool = queue_spool(tmp_path / "spool")
    seq = spool.append("team/app", b'{"id":"e1","action":"push","target":{"repository":"team/app"}}', 0.0)
    spool.advance("a", seq, [(Row(seq, "team/app", spool.read(0, 1)[0].data, 0.0), "HTTP 503")])
    config = tmp_path / "regmw.toml"
    config.write_text(f'[regmw]\nplugins = ["notifications"]\n[notifications]\nspool_dir = "{tmp_path / "spool"}"\n'
                      'allowed_networks = ["127.0.0.0/8"]\nendpoints = [{name = "a", url = "http://127.0.0.1:9/a"}, '
                      '{name = "b", url = "http://127.0.0.1:9/b"}]\n')

    def run(*args):
        return main(["-c", str(config), "notifications", "dead-letters", *args])

    assert [letter for letter, *_ in spool.dead("a")] == [1]
    for args in (["drop", "b", "1"], ["drop", "a", "abc"], ["drop", "a", "1", "7"], ["replay", "a", "7"],
                 ["replay", "b", "1"], ["show", "a", "x:y"]):
        assert run(*args) in (1, 2), args
    assert "no dead letter '7' for 'a'" in capsys.readouterr().err
    assert [letter for letter, *_ in spool.dead("a")] == [1]  # nothing dropped or replayed by the bad calls
    assert spool.count() == 1
    assert run("drop", "a", "1") == 0
    assert spool.dead("a") == []


def test_the_queue_depth_gauge_is_published_without_redis_too(embedded):
    receiver, client, _ = embedded()
    receiver.status = 503

    def depth():
        return REGISTRY.get_sample_value("regmw_notify_queue_depth", {"shard": "0", "endpoint": "hook"})

    for tag in ("v1", "v2"):
        assert client.put(f"/v2/team/app/manifests/{tag}", data=b"{}").status_code == 201
    wait_until(lambda: depth() == 2, 10, "a depth of 2 while the receiver refuses")
    receiver.status = 200
    wait_until(lambda: depth() == 0 and receiver.count() == 2, 10, "a depth of 0 once delivered")


def test_a_retry_after_of_a_429_or_503_is_waited_for_up_to_the_longest_step(embedded):
    """The schedule's next step is 0.05 s, but the receiver asked for 1 s: the retry comes after 1 s. A
    Retry-After longer than the schedule's longest step (1.5 s here) waits that step, not an hour."""
    receiver, client, _ = embedded(retry_schedule=[0, 0.05, 1.5], jitter=0)
    receiver.record = True
    receiver.status = 429
    receiver.reply_headers = {"Retry-After": "1"}
    assert client.put("/v2/team/app/manifests/v1", data=b"{}").status_code == 201
    wait_until(lambda: receiver.refused >= 2, 10, "a retry after the 429")
    receiver.status = 503
    receiver.reply_headers = {"Retry-After": "3600"}
    wait_until(lambda: receiver.refused >= 4, 10, "two retries after 503s asking for an hour")
    receiver.status = 200
    wait_until(lambda: receiver.count() == 1, 10, "the event once the receiver accepts")
    gaps = [later - earlier for earlier, later in zip(receiver.arrivals, receiver.arrivals[1:], strict=False)]
    assert gaps[0] >= 0.95, gaps  # Retry-After: 1, although the schedule said 0.05
    assert gaps[2] < 3.0, gaps  # Retry-After: 3600, capped at the longest step (1.5)


def test_only_a_serving_process_delivers_a_cli_command_leaves_the_queue_alone(webhook_receiver, tmp_path):
    """A CLI command builds the same runtime as the server; it must not start the delivery thread, which
    would deliver (or park and drop) queued events behind the operator's back while they inspect them."""
    import threading

    from regmw.runtime import build

    def deliverers() -> int:
        return sum(thread.name == "regmw-notify-delivery" and thread.is_alive() for thread in threading.enumerate())

    config = embedded_config(webhook_receiver(), tmp_path / "spool")
    before = deliverers()
    cli = build(config, environ={})
    assert deliverers() == before and cli.services.serving is False
    served = build(config, environ={}, serving=True)
    assert deliverers() == before + 1
    served.services.events.close()
    cli.services.events.close()


def test_an_odd_retry_after_from_one_receiver_stops_no_lane(webhook_receiver, tmp_path):
    """``Retry-After: ²`` (the byte 0xB2) raised in the lane that read it, and without Redis the lanes share
    one stop event: every endpoint's delivery stopped until a restart. Now a failed POST, retried."""
    odd, good = webhook_receiver(), webhook_receiver()
    odd.status, odd.reply_headers = 503, {"Retry-After": "\xb2"}
    config = embedded_config(odd, tmp_path / "spool", name="odd")
    config["notifications"]["endpoints"].append({"name": "good", "url": good.url, "secrets": [SECRET], "timeout": 0.5})
    middleware = RegistryMiddleware(registry_app, config, environ={})
    client = Client(middleware)
    try:
        assert client.put("/v2/team/app/manifests/v1", data=b"{}").status_code == 201
        wait_until(lambda: odd.refused >= 2, 10, "the odd receiver asked twice")
        assert client.put("/v2/team/app/manifests/v2", data=b"{}").status_code == 201
        wait_until(lambda: good.count() == 2, 10, "both events at the other endpoint")
        odd.status = 200
        wait_until(lambda: odd.count() == 2, 10, "both events at the odd one once it accepts")
    finally:
        middleware.services.events.close()


def test_a_failing_lane_ends_no_delivery_for_good(embedded, monkeypatch):
    """A lane's error (SQLite busy past its timeout, a full disk) set the stop event every lane shared
    without Redis: all delivery ended until a restart. Now the lanes start again and deliver from their
    cursors. The fault is one injected spool read failure: a real lock would take the 10 s busy timeout."""
    import sqlite3

    from regmw_notify.spool import Spool

    receiver, client, _ = embedded()
    assert client.put("/v2/team/app/manifests/v1", data=b"{}").status_code == 201
    wait_until(lambda: receiver.count() == 1, 10, "the first event delivered")
    read, failures = Spool.read, []

    def read_failing_once(self, after, limit):
        if not failures:
            failures.append(after)
            raise sqlite3.OperationalError("database is locked")
        return read(self, after, limit)

    monkeypatch.setattr(Spool, "read", read_failing_once)
    wait_until(lambda: failures, 10, "the lane's read failing")
    assert client.put("/v2/team/app/manifests/v2", data=b"{}").status_code == 201
    wait_until(lambda: receiver.count() == 2, 15, "the next event delivered by the restarted lane")
    assert [event["target"]["tag"] for event in receiver.snapshot()] == ["v1", "v2"]  # once each, in order
