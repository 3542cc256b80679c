"""Notifications against a real Redis and a real receiver on loopback: at-least-once, in order per repository."""
from __future__ import annotations

import random
import subprocess
import sys
import urllib.request
import signal
import threading
import time

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from regmw_notify.events import plugin_event
from regmw_notify.sink import NotifySink
from regmw_notify.stream import RedisStreams

from .servers.notify_apps import Connection, spawn_worker
from .servers.redis_server import start_redis
from .servers.webhook_receiver import SECRET, first_deliveries
from .servers._util import free_port, need_binary, stop, wait_for_port

pytestmark = pytest.mark.services


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def endpoint(receiver, name="hook", **extra) -> dict:
    table = {"name": name, "url": receiver.url, "secrets": [SECRET], "timeout": 0.5,
             "retry_schedule": [0, 0.05, 0.1, 0.2], "jitter": 0.2}
    table.update(extra)
    return table


def events_for(repositories: int, per_repository: int, seed: int = 7) -> list[dict]:
    """Events over ``repositories`` repositories, interleaved randomly; tag = its position in its repository."""
    order = [f"team{index % 20}/app{index}" for index in range(repositories) for _ in range(per_repository)]
    random.Random(seed).shuffle(order)
    counters: dict[str, int] = {}
    out = []
    for repository in order:
        counters[repository] = counters.get(repository, 0) + 1
        out.append(plugin_event("push", repository, tag=str(counters[repository])))
    return out


def check_order(received: list[dict], sent: list[dict]) -> None:
    """Every sent event arrived; per repository, first deliveries come in emission order."""
    firsts = first_deliveries(received)
    assert {event["id"] for event in firsts} == {event["id"] for event in sent}
    last: dict[str, int] = {}
    for event in firsts:
        repository, position = event["target"]["repository"], int(event["target"]["tag"])
        assert position == last.get(repository, 0) + 1, f"{repository}: {position} after {last.get(repository)}"
        last[repository] = position


@pytest.fixture
def aof_redis(tmp_path):
    """A throwaway redis-server with appendonly yes (durability is claimed); restartable on the same port."""
    args = ("--appendonly", "yes", "--appendfsync", "everysec")
    proc, port = start_redis(tmp_path, *args)
    server = {"proc": proc, "port": port, "url": f"redis://127.0.0.1:{port}/0"}

    def stop_server() -> None:
        redis.Redis(port=port).shutdown()  # graceful: the AOF is flushed, as in a planned restart
        server["proc"].wait(10)

    def start_server() -> None:
        server["proc"] = subprocess.Popen(
            [need_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(tmp_path), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port, proc=server["proc"])

    def restart() -> None:
        stop_server()
        start_server()

    server.update(restart=restart, stop=stop_server, start=start_server)
    yield server
    stop(server["proc"])


def test_one_worker_delivers_in_order_with_valid_signatures(aof_redis, webhook_receiver, tmp_path):
    receiver = webhook_receiver()
    sink = NotifySink(RedisStreams(Connection(aof_redis["url"]), 4), tmp_path / "spool")
    sent = events_for(20, 10)
    for event in sent:
        sink.emit(event)
    settings = {"url": aof_redis["url"], "shards": 4, "endpoints": [endpoint(receiver)],
                "spool_dir": str(tmp_path / "worker-spool")}
    worker = spawn_worker(settings)
    try:
        wait_until(lambda: receiver.count() >= len(sent), 30, "200 deliveries")
    finally:
        stop(worker)
    check_order(receiver.snapshot(), sent)
    assert receiver.bad_signatures == 0


def test_the_cli_worker_serves_its_delivery_metrics(aof_redis, webhook_receiver, tmp_path):
    """With Redis the deliveries happen in `regmw notifications worker`, so its metrics (deliveries, depth...)
    exist only there: `--metrics-listen` serves them; no other process can."""
    receiver = webhook_receiver()
    sink = NotifySink(RedisStreams(Connection(aof_redis["url"]), 2), tmp_path / "spool")
    sent = events_for(2, 3)
    for event in sent:
        sink.emit(event)
    config = tmp_path / "regmw.toml"
    config.write_text(f'[regmw]\nplugins = ["redis", "notifications"]\n[redis]\nurl = "{aof_redis["url"]}"\n'
                      f'[notifications]\nshards = 2\nallowed_networks = ["127.0.0.0/8"]\n'
                      f'spool_dir = "{tmp_path / "worker-spool"}"\n'
                      f'endpoints = [{{name = "hook", url = "{receiver.url}", secrets = ["{SECRET}"]}}]\n')
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-c", "import sys; from regmw.cli import main; sys.exit(main())",
                               "-c", str(config), "notifications", "worker", "--metrics-listen", f"127.0.0.1:{port}"])
    try:
        wait_for_port(port, proc=worker)

        def sample(name: str, **labels: str) -> float:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            for family in text_string_to_metric_families(text):
                for metric in family.samples:
                    if metric.name == name and all(metric.labels.get(k) == v for k, v in labels.items()):
                        return metric.value
            return -1.0

        wait_until(lambda: sample("regmw_notify_delivered_events_total", endpoint="hook") == len(sent), 30,
                   "the delivered events counted at --metrics-listen")
        assert receiver.count() >= len(sent)
        wait_until(lambda: sample("regmw_notify_queue_depth", endpoint="hook", shard="0") == 0, 10, "a depth gauge")
    finally:
        stop(worker)


def test_ten_thousand_events_survive_killed_workers_a_down_endpoint_and_a_redis_restart(
    aof_redis, webhook_receiver, tmp_path
):
    """10,000 events over 200 repositories, two competing workers, 5 SIGKILLs, an outage, a Redis restart."""
    receiver = webhook_receiver()
    shards = 16
    sink = NotifySink(RedisStreams(Connection(aof_redis["url"], timeout=0.25), shards), tmp_path / "spool",
                      breaker_seconds=0.2)
    sink.start()
    sent = events_for(200, 50)
    settings = {"url": aof_redis["url"], "shards": shards, "lease_ttl": 1.5, "claim_idle": 1.0,
                "endpoints": [endpoint(receiver)], "spool_dir": str(tmp_path / "worker-spool")}
    rng = random.Random(2026)
    for event in sent[:5000]:
        sink.emit(event)
    workers = [spawn_worker(settings), spawn_worker(settings)]
    emitter = threading.Thread(target=lambda: [sink.emit(event) for event in sent[5000:]])
    kills = 0

    def kill_one() -> None:
        nonlocal kills
        index = rng.randrange(len(workers))
        workers[index].send_signal(signal.SIGKILL)
        workers[index].wait(10)
        workers[index] = spawn_worker(settings)
        kills += 1

    def delivered() -> int:
        return len({event["id"] for event in receiver.snapshot()})

    try:
        for low, high in ((200, 800), (1200, 1800), (2200, 2800)):
            at = rng.randrange(low, high)
            wait_until(lambda at=at: delivered() >= at, 60, "deliveries before a kill")
            kill_one()
        # the endpoint goes down for a while: it refuses until the workers have retried 30 times
        receiver.status = 503
        wait_until(lambda: receiver.refused >= 30, 30, "retries against the down endpoint")
        receiver.status = 200
        wait_until(lambda: delivered() >= 3500, 60, "deliveries before the Redis restart")
        emitter.start()
        aof_redis["restart"]()
        for low, high in ((5500, 6500), (7500, 8500)):
            at = rng.randrange(low, high)
            wait_until(lambda at=at: delivered() >= at, 60, "deliveries before a kill")
            kill_one()
        emitter.join(60)
        wait_until(lambda: delivered() >= len(sent), 90, "every event delivered")
    finally:
        for worker in workers:
            stop(worker)
        sink.close()
    assert kills >= 5
    received = receiver.snapshot()
    check_order(received, sent)
    duplicates = len(received) - len(sent)
    print(f"{duplicates} duplicates after {kills} kills")
    assert duplicates < len(sent) / 100, f"{duplicates} duplicates"
    assert receiver.bad_signatures == 0
