"""Topology changes under load, each on a cluster of its own: a master SIGKILLed, slots resharded."""
from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import redis
from werkzeug.test import Client

from regmw import metrics
from regmw_redis.cluster import REDIRECTIONS, slot_of
from tests.servers.redis_apps import make_middleware


def _errors(backend: str, action: str) -> float:
    return metrics.REGISTRY.get_sample_value("regmw_backend_errors_total", {"backend": backend, "action": action}) or 0.0


def _redirections(kind: str) -> float:
    return REDIRECTIONS.labels(kind)._value.get()


def test_master_sigkill_under_load_no_5xx_and_writes_and_limits_resume(redis_cluster_fresh):
    group = redis_cluster_fresh
    counter = "regmw:ratelimit:LIMITER/repo/{repository:team/app}/1000000/1/hour"
    middleware = make_middleware(
        group.url, ratelimit={"rules": [{"name": "repo", "by": "repository", "limit": "1000000/hour"},
                                        {"name": "client", "by": "client", "limit": "1000000/hour"}]},
        readonly={"fail_closed_writes": False},
    )
    client = Client(middleware)
    # the [readonly] default: writes to lockable repositories fail closed while their lock cannot be read
    strict = Client(make_middleware(group.url, prefetch=False))
    statuses: Counter = Counter()
    strict_statuses: Counter = Counter()

    def request(index: int) -> None:
        if index % 5 == 0:
            response = client.put("/v2/team/app/manifests/latest", data=b"{}")
            refused = strict.put("/v2/team/app/manifests/latest", data=b"{}")
            strict_statuses[refused.status_code] += 1
            if refused.status_code == 503:
                assert refused.json["errors"][0]["code"] == "UNAVAILABLE" and refused.headers["Retry-After"].isdigit()
        else:
            response = client.get("/v2/team/app/manifests/latest")
        statuses[response.status_code] += 1

    for index in range(50):
        request(index)
    assert statuses == Counter({200: 40, 201: 10}) and strict_statuses == Counter({201: 10})
    victim = group.master_of(counter)
    raw = group.client()
    assert int(raw.get(counter)) == 50

    def replicated() -> bool:  # the victim's replica has every count, so promotion loses none of them
        return all(group.read_replica(port, counter) == b"50" for port in group.alive_ports()
                   if group.node(port).info("replication").get("master_port") == victim)

    deadline = time.monotonic() + 10
    while not replicated() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert replicated()

    opens_before = _errors("ratelimit", "fail_open")
    group.process(victim).send_signal(signal.SIGKILL)  # mid-load: the loop below keeps sending
    group.process(victim).wait(10)
    promoted = None
    resumed_at = None
    deadline = time.monotonic() + 30
    index = 0
    while time.monotonic() < deadline and index < 50_000:
        request(index)
        index += 1
        if resumed_at is None and index % 10 == 0:
            try:
                promoted = group.master_of(counter)
                if promoted != victim and int(group.node(promoted).get(counter) or 0) > 50:
                    resumed_at = index  # a request was counted on the promoted replica
            except (redis.RedisError, RuntimeError):
                pass
        if resumed_at is not None and index >= resumed_at + 100:
            break
    assert resumed_at is not None, "regmw never counted on the promoted master"
    assert set(statuses) <= {200, 201}, f"5xx while failing over: {statuses}"
    assert _errors("ratelimit", "fail_open") > opens_before  # the outage happened, and was failed open
    assert set(strict_statuses) == {201, 503}, strict_statuses  # fail-closed writes: 503 UNAVAILABLE, never a 500
    assert strict.put("/v2/team/app/manifests/latest", data=b"{}").status_code == 201  # and writes resumed
    # limits and writes resumed on the promoted master: each request counts once more
    new_master = group.node(promoted)
    before = int(new_master.get(counter))
    request(1)
    request(0)
    assert int(new_master.get(counter)) == before + 2
    assert middleware.services.locks.set_read_only("team/app", 30, "migrator") is not None
    assert client.put("/v2/team/app/manifests/latest", data=b"{}").status_code == 503
    middleware.services.cache.set("after", b"1", ttl=60)
    assert middleware.services.cache.get("after") == b"1"


def _low_slot_name(prefix: str, slots: range) -> str:
    """A repository name whose hash tag falls in ``slots`` (so resharding those slots moves its keys)."""
    for index in range(200_000):
        name = f"{prefix}{index}"
        if slot_of("{repository:" + name + "}") in slots:
            return name
    raise AssertionError("no name found")


def _low_slot_client(slots: range) -> str:
    for a in range(256):
        for b in range(256):
            address = f"10.0.{a}.{b}"
            if slot_of("{client:" + address + "}") in slots:
                return address
    raise AssertionError("no address found")


def test_reshard_under_load_no_errors_no_over_admission(redis_cluster_fresh):
    """``redis-cli --cluster reshard`` moves the slots of a repository's and a client's counters mid-load.

    Requests keep flowing (MOVED / ASK followed by redis-py), none fails or
    fails open, and the repository limit admits exactly its amount: a counter
    moves with MIGRATE (value and TTL together), so it is never counted in two
    places.
    """
    group = redis_cluster_fresh
    moved = range(0, 60)  # the first slots of the master owning slot 0: reshard takes them first
    repository = _low_slot_name("team/app", moved)
    peer = _low_slot_client(moved)
    limit = 150
    middleware = make_middleware(
        group.url, ratelimit={"rules": [{"name": "repo", "by": "repository", "limit": f"{limit}/hour"},
                                        {"name": "client", "by": "client", "limit": "1000000/hour"}]},
    )
    client = Client(middleware)
    path = f"/v2/{repository}/manifests/latest"
    source = group.master_of("{repository:" + repository + "}")
    assert source == group.master_of("{client:" + peer + "}")
    target = next(port for port in group.alive_ports()
                  if port != source and group.node(port).info("replication")["role"] == "master")
    source_id = group.node(source).execute_command("CLUSTER", "MYID").decode()
    target_id = group.node(target).execute_command("CLUSTER", "MYID").decode()

    # The loader thread owns ``statuses`` (read after join). ``durations`` (one entry per answered
    # request; append and len are atomic) is what the main thread polls, ``errors`` what the loader
    # raised (werkzeug's Client raises a middleware exception in the thread, where it would be lost),
    # ``in_flight`` when the request being answered started (a hang is reported as one).
    statuses: Counter = Counter()
    durations: list[float] = []
    errors: list[BaseException] = []
    in_flight: list[float] = []
    done = threading.Event()
    failures = (_errors("ratelimit", "fail_open"), _errors("cache", "miss"))
    redirects = _redirections("moved") + _redirections("ask")
    # A request makes a few Redis commands (one admission script per slot group, each re-run once
    # through the cluster client after a redirection), each bounded by its timeouts and retries:
    # ten command deadlines is generous, and far below the 30 s a hang would take.
    bound = 10 * middleware.services.redis.command_deadline

    def get() -> None:
        in_flight[:] = [time.monotonic()]
        status = client.get(path, environ_overrides={"REMOTE_ADDR": peer}).status_code
        durations.append(time.monotonic() - in_flight.pop())
        statuses[status] += 1

    def load() -> None:
        try:
            while not done.is_set() and len(durations) < 5_000:
                get()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    for _ in range(20):
        get()
    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        group.redis_cli("--cluster", "reshard", f"127.0.0.1:{source}", "--cluster-from", source_id,
                        "--cluster-to", target_id, "--cluster-slots", str(len(moved)), "--cluster-yes", timeout=60)
        sent_at_move = len(durations)
        # How many requests ran during the move depends on the machine's load (on two busy cores the
        # reshard can end after a few dozen), so the load goes on until 50 requests ran on the new
        # layout AND the limit was passed by 50, whichever comes later.
        wanted = max(sent_at_move + 50, limit + 50)
        deadline = time.monotonic() + 30
        while len(durations) < wanted and loader.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)  # polled, bounded
    finally:
        done.set()
        loader.join(30)
    hung = time.monotonic() - in_flight[0] if in_flight else float("inf")
    assert not loader.is_alive(), f"a request hung for {hung:.1f} s (bound {bound} s)"
    assert not errors, f"the loader died after {len(durations)} requests: {errors[0]!r}"
    assert max(durations) < bound, f"slowest request {max(durations):.2f} s, bound {bound} s"
    assert len(durations) >= wanted, (f"{len(durations)} requests answered, {sent_at_move} at the move, "
                                      f"wanted {wanted}: the load stalled")
    assert group.master_of("{repository:" + repository + "}") == target  # the keys really moved
    assert set(statuses) <= {200, 429}, statuses
    assert sum(statuses.values()) > limit
    assert statuses[200] == limit  # no over-admission across the move
    assert (_errors("ratelimit", "fail_open"), _errors("cache", "miss")) == failures  # no errors reached a feature
    assert _redirections("moved") + _redirections("ask") > redirects  # the load did meet the move
    counter = f"regmw:ratelimit:LIMITER/repo/{{repository:{repository}}}/{limit}/1/hour"
    assert int(group.node(target).get(counter)) == sum(statuses.values())
    assert 0 < group.node(target).pttl(counter) <= 3_600_000
