"""Database routing against a REAL PostgreSQL primary and a REAL streaming replica.

Requests go through :class:`regmw.RegistryMiddleware` in front of a small
Flask app that writes and reads a table through ``environ["regmw.db"]``. Every
read answers with ``inet_server_port()``, so the tests see which server
actually served it, not just what the router claims. The replica replays with
a 200 ms ``recovery_min_apply_delay``, so a read that went to it too early
WOULD be stale. State changes are awaited by polling with a deadline.
"""
from __future__ import annotations

import functools
import itertools
import subprocess
import threading
import time

import pytest
from flask import Flask, jsonify, request
from regmw_dbroute import DbHandle, Router
from regmw_dbroute.flask import db_session
from regmw_dbroute.flask import init_app as dbroute_init_app
from regmw_dbroute.lsn import from_key
from regmw_dbroute.store import StoreUnavailable
from sqlalchemy import text
from werkzeug.test import Client

from regmw.middleware import RegistryMiddleware

from .servers._util import need_binary, stop, wait_for_port
from .servers._util import wait_until as poll_until

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]

_counter = itertools.count(1)


def make_app() -> Flask:
    app = Flask("dbroute-test")
    dbroute_init_app(app)

    @app.route("/v2/<path:name>/manifests/<reference>", methods=["GET", "PUT"])
    def manifest(name, reference):
        handle: DbHandle = request.environ["regmw.db"]
        if request.method == "PUT":
            handle.execute(
                text("INSERT INTO kv (repo, value) VALUES (:r, :v) "
                     "ON CONFLICT (repo) DO UPDATE SET value = EXCLUDED.value"),
                {"r": name, "v": int(request.get_data())},
            )
            return "", 201
        row = handle.execute(
            text("SELECT (SELECT value FROM kv WHERE repo = :r), inet_server_port()"), {"r": name}
        )[0]
        return jsonify(value=row[0], port=row[1], role=handle.role, reason=handle.reason)

    @app.get("/v2/<path:name>/tags/list")
    def tags(name):
        session = db_session()
        row = session.execute(
            text("SELECT (SELECT value FROM kv WHERE repo = :r), inet_server_port()"), {"r": name}
        ).one()
        return jsonify(value=row[0], port=row[1], role=current_role())

    def current_role():
        return request.environ["regmw.db"].role

    return app


def db_config(cluster, **overrides) -> dict:
    database = {
        "primary": cluster.primary_url,
        "replicas": [cluster.replica_url],
        "health_interval": 0.1,
        "max_replay_lag": 1.0,
        "max_byte_lag": 64 * 1024 * 1024,
        "failure_threshold": 2,
        "reintegrate_after": 2,
        "connect_timeout": 2,
        "lsn_ttl": 60.0,
        "replay_position_max_age": 0.02,
        "store": "memory",
    }
    database.update(overrides)
    return {"regmw": {"plugins": ["dbroute"], "entry_points": False}, "database": database}


class Registry:
    """A middleware-wrapped app plus helpers; closes its router at teardown."""

    def __init__(self, config: dict) -> None:
        self.middleware = RegistryMiddleware(make_app(), config, environ={})
        self.client = Client(self.middleware)
        self.router: Router = self.middleware.services.db_router

    def put(self, repo: str, value: int) -> int:
        return self.client.put(f"/v2/{repo}/manifests/latest", data=str(value)).status_code

    def get(self, repo: str) -> dict:
        response = self.client.get(f"/v2/{repo}/manifests/latest")
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()

    def close(self) -> None:
        self.router.close()


@pytest.fixture
def cluster(pg_cluster):
    pg_cluster.sql("primary", "CREATE TABLE IF NOT EXISTS kv (repo text PRIMARY KEY, value bigint NOT NULL)")
    pg_cluster.wait_replica_caught_up()
    return pg_cluster


@pytest.fixture
def registry(cluster):
    reg = Registry(db_config(cluster))
    yield reg
    reg.close()


def wait_until(predicate, timeout: float = 20.0, what: str = "condition"):
    """The shared poll-with-deadline, with a 20 s default: replication and health checks take longer here."""
    return poll_until(predicate, timeout, what)


def unique(prefix: str) -> str:
    return f"{prefix}/r{next(_counter)}-{int(time.time() * 1000) % 100000}"


# --- the rule -----------------------------------------------------------------


def test_write_then_immediate_read_never_stale(registry, cluster):
    repo = unique("ryw")
    served = {"primary": 0, "replica": 0}
    replica_behind = 0
    for value in range(1, 41):
        assert registry.put(repo, value) == 201
        answer = registry.get(repo)
        assert answer["value"] == value, f"stale read after write {value}: {answer}"
        served[answer["role"]] += 1
        port = cluster.primary_port if answer["role"] == "primary" else cluster.replica_port
        assert answer["port"] == port
        # Reading the replica directly, bypassing regmw, shows it really was behind.
        replica_behind += cluster.sql("replica", "SELECT value FROM kv WHERE repo = %s", repo) != [(value,)]
    # So the test could have caught a stale read, and routing had to use the primary.
    assert replica_behind > 0 and served["primary"] > 0
    # Once the replica caught up, reads of the repository go to it again.
    answer = wait_until(lambda: (a := registry.get(repo))["role"] == "replica" and a, what="read on replica")
    assert answer["value"] == 40 and answer["port"] == cluster.replica_port


def test_reads_without_recent_writes_go_to_the_replica(registry, cluster):
    repo = unique("quiet")
    cluster.sql("primary", "INSERT INTO kv (repo, value) VALUES (%s, 7)", repo)  # not through regmw: no position
    cluster.wait_replica_caught_up()
    for _ in range(20):
        answer = registry.get(repo)
        assert (answer["value"], answer["port"], answer["role"]) == (7, cluster.replica_port, "replica")
        # no position for the repository (the start-up floor, long reached, may count as "caught-up")
        assert answer["reason"] in ("no-position", "caught-up")


def test_flask_session_helper_uses_the_routed_database(registry, cluster):
    repo = unique("session")
    assert registry.put(repo, 5) == 201
    response = registry.client.get(f"/v2/{repo}/tags/list")
    assert response.status_code == 200
    assert response.get_json()["value"] == 5  # immediately after the write: never stale
    cluster.wait_replica_caught_up()
    answer = wait_until(lambda: (a := registry.client.get(f"/v2/{repo}/tags/list").get_json())["role"] == "replica" and a,
                        what="session read on the replica")
    assert answer["port"] == cluster.replica_port and answer["value"] == 5


def test_position_is_recorded_before_the_client_sees_the_response(cluster):
    """The app streams its body; by the time the first byte is produced the position is stored."""
    seen = {}
    app = make_app()

    @app.put("/v2/<path:name>/blobs/uploads/<uid>")
    def streamed_write(name, uid):
        handle = request.environ["regmw.db"]
        handle.execute(text("INSERT INTO kv (repo, value) VALUES (:r, 1) ON CONFLICT (repo) DO NOTHING"), {"r": name})
        router = request.environ["regmw.context"].services.db_router

        def body():  # runs after start_response, before any byte reaches the client
            seen["position"] = router.store.get(name).repository
            yield b"ok"

        return app.response_class(body(), status=201)

    middleware = RegistryMiddleware(app, db_config(cluster), environ={})
    try:
        repo = unique("stream")
        response = Client(middleware).put(f"/v2/{repo}/blobs/uploads/abc")
        assert response.status_code == 201
        assert seen["position"] is not None
    finally:
        middleware.services.db_router.close()


def test_writes_go_to_the_primary_and_record_the_maximum_position(registry, cluster):
    repo = unique("writes")
    assert registry.put(repo, 1) == 201
    first = registry.router.store.get(repo).repository
    assert first is not None
    assert registry.put(repo, 2) == 201
    second = registry.router.store.get(repo).repository
    assert second > first
    registry.router.store.advance(repo, first, 60)  # an out-of-order, older position
    assert registry.router.store.get(repo).repository == second


# --- two replicas: try the others before falling back to the primary --------------------


def wait_replayed(cluster, replica, position: int, timeout: float = 10.0) -> None:
    """Poll until ``replica`` has replayed ``position`` (a deadline, not a timing sleep).

    ``pg_current_wal_insert_lsn()`` points past the next page header when the
    write ended exactly on a page boundary, a position a replica only reaches
    with the next WAL record; if it takes a while, one unrelated row provides it.
    """
    nudge_at = time.monotonic() + 1.0
    deadline = time.monotonic() + timeout
    while replica.replay_lsn() < position:
        if time.monotonic() > deadline:
            raise AssertionError(f"replica {replica.name} did not replay {position} within {timeout}s")
        if time.monotonic() > nudge_at:
            cluster.sql("primary", "INSERT INTO kv (repo, value) VALUES ('wal/nudge', 0) "
                                   "ON CONFLICT (repo) DO UPDATE SET value = kv.value + 1")
            nudge_at = time.monotonic() + 1.0
        time.sleep(0.005)


def test_read_after_write_goes_to_the_caught_up_one_of_two_replicas(cluster, pg_second_replica):
    """One replica paused far behind, one up to date: reads of a just-written repository use the
    up-to-date one whichever the rotation tries first; both behind → the primary."""
    lagging, fresh = cluster, pg_second_replica
    pg_second_replica.wait_caught_up()
    # Lag thresholds far above the test's length: the paused replica stays ELIGIBLE (not
    # quarantined), so the router really has to pass over it by its replay position.
    # replay_position_max_age=0: a read asks the replicas for their replay position rather than
    # reuse one the checker read just before the write reached the up-to-date replica.
    config = db_config(cluster, max_replay_lag=60.0, lsn_ttl=120.0, max_byte_lag=1 << 40,
                       replay_position_max_age=0.0)
    config["database"]["replicas"] = [lagging.replica_url, fresh.url]
    reg = Registry(config)
    try:
        states = [state for _, state in reg.router.replicas]
        assert len(states) == 2
        wait_until(lambda: all(s.eligible(time.monotonic()) for s in states), what="both replicas eligible")
        lagging.pause_replay()  # from now on the first replica replays nothing

        repo = unique("two")
        for value in range(1, 9):  # the rotation puts the lagging replica first on every other read
            assert reg.put(repo, value) == 201
            position = reg.router.store.get(repo).repository
            assert position is not None
            wait_replayed(cluster, fresh, position)  # no apply delay: a few ms
            answer = reg.get(repo)
            assert answer == {"value": value, "port": fresh.port, "role": "replica", "reason": "caught-up"}, (
                f"read {value} not served by the up-to-date replica: {answer}")
            # The lagging replica, read directly, really is behind: serving it would have been stale.
            assert lagging.sql("replica", "SELECT value FROM kv WHERE repo = %s", repo) != [(value,)]
        assert all(s.eligible(time.monotonic()) for s in states), [s.as_dict() for s in states]

        fresh.pause_replay()  # now both replicas are behind
        assert reg.put(repo, 100) == 201
        position = reg.router.store.get(repo).repository
        answer = reg.get(repo)
        assert answer == {"value": 100, "port": cluster.primary_port, "role": "primary",
                          "reason": "replicas-behind"}, answer
        assert fresh.replay_lsn() < position
        assert fresh.sql("SELECT value FROM kv WHERE repo = %s", repo) != [(100,)]
        assert lagging.sql("replica", "SELECT value FROM kv WHERE repo = %s", repo) != [(100,)]

        fresh.resume_replay()  # the up-to-date replica catches up: reads go back to it
        answer = wait_until(lambda: (a := reg.get(repo))["role"] == "replica" and a, what="read on a replica")
        assert answer["value"] == 100 and answer["port"] == fresh.port
    finally:
        reg.close()


# --- failures ---------------------------------------------------------------------


@pytest.fixture(params=["pre-ping", "no-pre-ping"])
def registry_ping(request, cluster):
    """With pre-ping a dead pooled connection fails at connect(); without, inside execute()."""
    reg = Registry(db_config(cluster, pre_ping=request.param == "pre-ping"))
    yield reg
    reg.close()


def test_replica_stopped_reads_served_by_primary(registry_ping, cluster):
    registry = registry_ping
    repo = unique("stopped")
    cluster.sql("primary", "INSERT INTO kv (repo, value) VALUES (%s, 3)", repo)
    cluster.wait_replica_caught_up()
    for _ in range(3):  # leaves pooled connections to the replica behind
        assert registry.get(repo)["port"] == cluster.replica_port
    cluster.stop_replica()
    for _ in range(15):  # right away: the handle retries failed replica reads on the primary
        answer = registry.get(repo)
        assert answer["value"] == 3 and answer["port"] == cluster.primary_port
    state = registry.router.replica_state()
    wait_until(lambda: state.quarantined, what="replica quarantined")
    assert registry.get(repo)["reason"] == "no-replica"

    cluster.start_replica()
    wait_until(lambda: state.eligible(time.monotonic()), what="replica reintegrated")
    answer = wait_until(lambda: (a := registry.get(repo))["role"] == "replica" and a, what="read on replica")
    assert answer["port"] == cluster.replica_port and answer["value"] == 3


@pytest.mark.parametrize("how", ["pause-replay", "apply-delay"])
def test_lagging_replica_quarantined_then_reintegrated(registry, cluster, how):
    state = registry.router.replica_state()
    assert state.eligible(time.monotonic()) and not state.quarantined
    quiet = unique("lagq")
    cluster.sql("primary", "INSERT INTO kv (repo, value) VALUES (%s, 1)", quiet)
    cluster.wait_replica_caught_up()
    if how == "pause-replay":
        cluster.pause_replay()
    else:
        cluster.set_apply_delay("3s")  # ALTER SYSTEM + pg_reload_conf on the replica
    repo = unique("lag")
    assert registry.put(repo, 1) == 201  # WAL the replica will not replay for a while
    wait_until(lambda: state.quarantined, what="replica quarantined for lag")
    assert "replay lag" in state.reason
    answer = registry.get(quiet)  # even a repository without writes avoids the lagging replica
    assert answer["port"] == cluster.primary_port and answer["reason"] == "no-replica"
    assert registry.get(repo)["value"] == 1

    if how == "pause-replay":
        cluster.resume_replay()
    # (with a 3 s delay the replica catches up by itself once the delay passed)
    wait_until(lambda: not state.quarantined, timeout=30, what="replica reintegrated")
    answer = wait_until(lambda: (a := registry.get(quiet))["role"] == "replica" and a, what="read on replica")
    assert answer["port"] == cluster.replica_port


def test_primary_down_writes_fail_fast_with_503(registry, cluster):
    repo = unique("down")
    assert registry.put(repo, 1) == 201
    cluster.stop_primary()
    started = time.monotonic()
    response = registry.client.put(f"/v2/{repo}/manifests/latest", data="2")
    assert response.status_code == 503
    assert response.get_json()["errors"][0]["code"] == "UNAVAILABLE"
    assert time.monotonic() - started < 10  # connect timeout 2 s: an answer, not a hang
    # Once the primary is known down, the route hook refuses writes before the app runs.
    wait_until(lambda: not registry.router.primary_state.up, what="primary marked down")
    started = time.monotonic()
    response = registry.client.put(f"/v2/{repo}/manifests/latest", data="3")
    assert response.status_code == 503 and response.headers.get("Retry-After")
    assert response.get_json()["errors"][0]["detail"]["database"] == registry.router.primary.name
    assert time.monotonic() - started < 3
    # Reads of a repository without a recorded write still work from the replica.
    quiet_answer = registry.client.get("/v2/never/written/manifests/latest")
    assert quiet_answer.status_code == 200 and quiet_answer.get_json()["port"] == cluster.replica_port
    cluster.start_primary()
    wait_until(lambda: registry.put(repo, 4) == 201, what="writes accepted again")


def test_a_restarted_primary_costs_no_write(registry, cluster):
    """The primary restarts between two writes: the pooled connections to it are dead. The next write
    gets a new one (pre-ping), not a 503 and a primary marked down."""
    repo = unique("restarted")
    for value in range(1, 4):  # pooled connections to the primary
        assert registry.put(repo, value) == 201
    cluster.stop_server(cluster.primary_dir, "fast")
    cluster.start_primary()
    wait_until(lambda: registry.router.primary_state.up, what="the checker sees the primary back")
    response = registry.client.put(f"/v2/{repo}/manifests/latest", data="4")
    assert response.status_code == 201, response.get_data(as_text=True)
    assert registry.router.primary_state.up, registry.router.primary_state.reason
    assert cluster.sql("primary", "SELECT value FROM kv WHERE repo = %s", repo) == [(4,)]


def test_a_statement_failing_on_a_working_primary_does_not_mark_it_down(cluster):
    """A lock timeout (psycopg2 raises it as an OperationalError, like a deadlock or a serialization
    failure) is the app's to handle: it gets SQLAlchemy's error, the primary stays up for everyone."""
    import psycopg2
    from sqlalchemy.exc import OperationalError

    app = make_app()

    @app.put("/v2/<path:name>/blobs/uploads/<uid>")
    def locking_write(name, uid):
        handle = request.environ["regmw.db"]
        lock = text("SET LOCAL lock_timeout = '50ms'; LOCK TABLE kv IN ACCESS EXCLUSIVE MODE")
        if uid == "uncaught":  # left to init_app: Flask's own 500, like any error of the app's SQL
            handle.execute(lock)
        try:
            handle.execute(lock)
        except OperationalError as exc:
            return f"locked: {exc.orig.pgcode}", 409
        return "", 201

    middleware = RegistryMiddleware(app, db_config(cluster), environ={})
    router: Router = middleware.services.db_router
    holder = psycopg2.connect(host="127.0.0.1", port=cluster.primary_port, user="postgres", dbname="postgres")
    try:
        with holder.cursor() as cursor:
            cursor.execute("LOCK TABLE kv IN ACCESS SHARE MODE")  # held until the rollback below
        response = Client(middleware).put(f"/v2/{unique('locked')}/blobs/uploads/u")
        assert (response.status_code, response.get_data(as_text=True)) == (409, "locked: 55P03")
        assert router.primary_state.up, router.primary_state.reason
        response = Client(middleware).put(f"/v2/{unique('locked')}/blobs/uploads/uncaught")
        assert response.status_code == 500
        assert router.primary_state.up, router.primary_state.reason
    finally:
        holder.rollback()
        holder.close()
        router.close()


# --- the shared (Redis) store -------------------------------------------------------


def redis_config(cluster, redis_url: str) -> dict:
    config = db_config(cluster, store="auto")
    config["regmw"]["plugins"] = ["redis", "dbroute"]
    config["redis"] = {"url": redis_url}
    # The redis plugin's read-only check would refuse writes while Redis is down;
    # these tests are about the database routing, so let writes through.
    config["readonly"] = {"fail_closed_writes": False}
    return config


def start_redis_on(port: int, tmp_path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [need_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc=proc)
    return proc


def test_redis_store_shares_positions_between_instances(cluster, redis_server):
    _proc, url = redis_server
    writer, reader = Registry(redis_config(cluster, url)), Registry(redis_config(cluster, url))
    try:
        assert writer.router.store.kind == "redis"
        repo = unique("shared")
        primary_reads = 0
        for value in range(1, 21):
            assert writer.put(repo, value) == 201
            answer = reader.get(repo)  # ANOTHER instance reads right after the write
            assert answer["value"] == value, f"stale read through the second instance: {answer}"
            primary_reads += answer["role"] == "primary"
        assert primary_reads > 0
        import redis

        client = redis.Redis.from_url(url)
        key = f"regmw:{{repository:{repo}}}:lsn"
        raw = client.get(key)
        assert raw is not None and len(raw) == 16
        assert from_key(raw) == writer.router.store.get(repo).repository
        assert 0 < client.pttl(key) <= 60_000
    finally:
        writer.close()
        reader.close()


def test_redis_store_keeps_the_maximum_exactly(cluster, redis_server):
    _, url = redis_server
    reg = Registry(redis_config(cluster, url))
    try:
        store = reg.router.store
        big = (1 << 60) + 3  # beyond a Lua double's exact range: compared by halves
        assert store.advance("cas/a", big, 30) == big
        assert store.advance("cas/a", big - 1, 30) == big
        assert store.advance("cas/a", big + 1, 30) == big + 1
        assert store.get("cas/a").repository == big + 1
    finally:
        reg.close()


def test_store_down_reads_go_to_primary_never_stale(cluster, tmp_path, redis_server):
    """Redis dies; the writing instance dies too; Redis comes back empty. No read is stale."""
    proc, url = redis_server
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    config = redis_config(cluster, url)
    config["database"].update(max_replay_lag=10.0, store_retry=0.2)
    writer, reader = Registry(config), Registry(config)
    restarted = None
    try:
        quiet = unique("sd-quiet")
        cluster.sql("primary", "INSERT INTO kv (repo, value) VALUES (%s, 9)", quiet)
        cluster.wait_replica_caught_up()
        assert reader.get(quiet)["port"] == cluster.replica_port
        cluster.pause_replay()  # from now on, any read served by the replica would be stale

        stop(proc)  # Redis is gone
        answer = reader.get(quiet)
        assert answer == {"value": 9, "port": cluster.primary_port, "role": "primary",
                          "reason": "store-unavailable"}
        repo = unique("sd-write")
        # The replay is paused, so a write whose position cannot be stored waits for the bound
        # (max_replay_lag + staleness) before it is answered; shorten it to exercise the floor.
        writer.router.await_replay = functools.partial(writer.router.await_replay, timeout=0.2)
        for value in range(1, 6):  # writes still work; their positions cannot be stored
            assert writer.put(repo, value) == 201
            assert writer.get(repo)["value"] == value
            assert reader.get(repo)["value"] == value
        assert writer.router.status()["pending"] >= 1
        writer.close()  # the writing instance dies with its pending positions

        # Redis comes back EMPTY (no persistence). The reader finds no epoch
        # marker and sets a floor at the primary's current position, which
        # covers the write nobody could record.
        restarted = start_redis_on(port, tmp_path)
        wait_until(lambda: time.monotonic() >= reader.router._store_down_until, what="store retry window over")
        answer = reader.get(repo)
        assert answer["value"] == 5, f"stale read after the store lost its data: {answer}"
        assert answer["role"] == "primary" and answer["reason"] == "replicas-behind"
        import redis

        client = redis.Redis.from_url(url)
        assert client.exists("regmw:{dbroute}:epoch") and client.get("regmw:{dbroute}:floor")

        cluster.resume_replay()
        answer = wait_until(lambda: (a := reader.get(repo))["role"] == "replica" and a, what="replica reads resume")
        assert answer["value"] == 5
    finally:
        writer.close()
        reader.close()
        if restarted is not None:
            stop(restarted)


def test_positions_recorded_while_store_down_are_flushed_later(cluster, tmp_path, redis_server):
    proc, url = redis_server
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    reg = Registry(redis_config(cluster, url))
    restarted = None
    try:
        stop(proc)
        repo = unique("flush")
        assert reg.put(repo, 1) == 201
        assert reg.router.status()["pending"] == 1
        assert reg.get(repo)["reason"] in ("unrecorded-write", "store-unavailable")
        restarted = start_redis_on(port, tmp_path)
        wait_until(lambda: reg.router.status()["pending"] == 0, what="pending position flushed by the checker")
        import redis

        stored = from_key(redis.Redis.from_url(url).get(f"regmw:{{repository:{repo}}}:lsn"))
        assert stored is not None and stored >= 1
    finally:
        reg.close()
        if restarted is not None:
            stop(restarted)


def test_a_hung_store_is_waited_for_once(cluster, redis_server):
    """Redis stopped with SIGSTOP: each call waits out its timeouts. After one failure the writes within
    ``store_retry`` do not ask again (pending, answered after the replicas replayed them), and a failure
    the shared Redis connection just met elsewhere (the admission's call) is not waited out again."""
    import signal

    proc, url = redis_server
    config = redis_config(cluster, url)
    config["database"]["store_retry"] = 30.0  # the window outlasts the test: nothing below depends on its end
    reg = Registry(config)
    calls = {"get": 0, "advance": 0}
    store = reg.router.store

    test_thread = threading.get_ident()

    def counted(name, script):
        # Only this thread's calls (the requests'): the health checker's flush of the pending
        # position asks the store in the background at its own pace, which is not waited for here.
        def call(*args, **kwargs):
            if threading.get_ident() == test_thread:
                calls[name] += 1
            return script(*args, **kwargs)
        return call

    store._get, store._advance = counted("get", store._get), counted("advance", store._advance)
    repo = unique("hung")
    try:
        assert reg.put(repo, 1) == 201 and calls["advance"] == 1
        proc.send_signal(signal.SIGSTOP)
        assert reg.get(repo) == {"value": 1, "port": cluster.primary_port, "role": "primary",
                                 "reason": "store-unavailable"}
        assert calls["get"] >= 1
        for value in (2, 3):
            assert reg.put(repo, value) == 201
            assert reg.get(repo)["value"] == value
        assert calls["advance"] == 1, "a write waited for the hung store again"
        assert reg.router.status()["pending"] == 1

        connection = reg.middleware.services.redis
        connection.note_down()  # e.g. the admission's script just timed out on the same Redis
        asked = calls["get"]
        with pytest.raises(StoreUnavailable):
            store.get(repo)
        assert calls["get"] == asked
    finally:
        proc.send_signal(signal.SIGCONT)
    try:
        wait_until(lambda: reg.router.status()["pending"] == 0, what="pending position flushed once Redis answers")
        assert store.get(repo).repository is not None
    finally:
        reg.close()


# --- pools: recording positions never needs (or waits for) a request connection ------------


def held_connection_app(how: str) -> Flask:
    """A write whose connection stays checked out until after ``start_response``.

    ``handle``: the connection comes from ``handle.connect()`` (regmw closes it
    in ``regmw_finish``); ``engine``: straight from ``handle.engine``, unknown to
    the handle, closed when the body is done.
    """
    app = make_app()

    @app.put("/v2/<path:name>/blobs/uploads/<uid>")
    def held_write(name, uid):
        handle = request.environ["regmw.db"]
        conn = handle.connect() if how == "handle" else handle.engine.connect()
        conn.execute(text("INSERT INTO kv (repo, value) VALUES (:r, 1) ON CONFLICT (repo) DO NOTHING"), {"r": name})
        conn.commit()

        def body():  # runs after start_response: the connection is still checked out then
            try:
                yield b"ok"
            finally:
                if how == "engine":
                    conn.close()

        return app.response_class(body(), status=201)

    return app


@pytest.mark.parametrize("how", ["handle", "engine"])
def test_write_position_recorded_while_the_request_holds_the_only_pooled_connection(cluster, how):
    """pool_size=1, max_overflow=0: the request pool is empty when the position is read."""
    config = db_config(cluster, pool_size=1, max_overflow=0, pool_timeout=1.0)
    middleware = RegistryMiddleware(held_connection_app(how), config, environ={})
    router: Router = middleware.services.db_router
    try:
        client = Client(middleware)
        for attempt in range(3):
            repo = unique(f"held-{how}")
            with client.put(f"/v2/{repo}/blobs/uploads/u{attempt}") as response:
                assert response.status_code == 201
                assert response.get_data() == b"ok"
            assert router.primary_state.up, router.primary_state.reason
            assert router.status()["pending"] == 0
            position = router.store.get(repo).repository
            assert position is not None
            primary_now = int(cluster.sql("primary", "SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")[0][0])
            assert position <= primary_now
        with client.get(f"/v2/{repo}/manifests/latest") as response:  # the follow-up read is not stale
            assert response.status_code == 200 and response.get_json()["value"] == 1
    finally:
        router.close()


def test_a_pool_timeout_never_marks_the_primary_down(cluster):
    # health_interval 1 s: replicas stay eligible (staleness 5 s) across the check-pool timeouts below
    reg = Registry(db_config(cluster, pool_size=1, max_overflow=0, pool_timeout=0.2, health_interval=1.0))
    router = reg.router
    repo = unique("pooltimeout")
    held = router.primary.engine.connect()  # the only request connection
    try:
        # The write's own connect() times out: that request gets a 503 ...
        response = reg.client.put(f"/v2/{repo}/manifests/latest", data="1")
        assert response.status_code == 503
        response.close()
        # ... but the primary is not down: other requests and the checker go on.
        assert router.primary_state.up, router.primary_state.reason
        assert router.route(repo, is_write=True).role == "primary"

        # The position pool and the checker's pool exhausted too (the checker stopped: rounds by hand):
        # the position is unknown (kept pending), the primary still up, even for a health round that
        # times out on its own pool.
        router.ensure_running()
        router.checker.stop()
        busy = [engine.connect() for engine in (router.primary.position_engine, router.primary.check_engine)
                for _ in range(2)]
        try:
            assert router.record_write(repo) is None
            router.check()
            assert router.primary_state.up, router.primary_state.reason
            assert router.status()["pending"] == 1
            assert router.route(repo, is_write=False).reason == "unrecorded-write"
        finally:
            for conn in busy:
                conn.close()
    finally:
        held.close()
    router.check()  # the next round stores the unknown position (today's covers it)
    assert router.status()["pending"] == 0
    assert router.store.get(repo).repository is not None
    # A replica's check pool (shared with writes waiting for replay) timing out is no replica failure either.
    replica = router.replicas[0][0]
    busy = [replica.check_engine.connect() for _ in range(2)]
    try:
        router.check()
    finally:
        for conn in busy:
            conn.close()
    assert router.replica_state().failures == 0, router.replica_state().reason
    reg.close()


def test_a_busy_position_pool_still_records_the_write_for_other_instances(cluster, redis_server):
    """Both position-pool connections busy when a write is answered: its position is read on the checker's
    pool and stored, so another instance does not read the write stale from the lagging replica."""
    _, url = redis_server
    config = redis_config(cluster, url)
    config["database"]["pool_timeout"] = 0.2
    writer, reader = Registry(config), Registry(config)
    try:
        cluster.set_apply_delay("2s")
        repo = unique("busy-positions")
        busy = [writer.router.primary.position_engine.connect() for _ in range(2)]
        try:
            assert writer.put(repo, 1) == 201
        finally:
            for conn in busy:
                conn.close()
        answer = reader.get(repo)  # another instance, right after the answer
        assert cluster.sql("replica", "SELECT value FROM kv WHERE repo = %s", repo) == []  # replica behind
        assert answer["value"] == 1, f"stale read through the second instance: {answer}"
        assert writer.router.status()["pending"] == 0
    finally:
        writer.close()
        reader.close()


# --- the store's namespace -------------------------------------------------------------------


def test_position_keys_use_the_configured_namespace(cluster, redis_server):
    """Deployments sharing one Redis keep their positions apart."""
    import redis

    _proc, url = redis_server
    a = Registry(db_config(cluster, store="auto", store_url=url, store_namespace="team-a"))
    config_b = redis_config(cluster, url)  # the redis plugin's namespace, with and without store_url
    config_b["redis"]["namespace"] = "team-b"
    b = Registry(config_b)
    config_c = redis_config(cluster, url)
    config_c["redis"]["namespace"] = "team-c"
    config_c["database"]["store_url"] = url
    c = Registry(config_c)
    try:
        repo = unique("ns")
        for value, reg in enumerate((a, b, c), start=1):
            assert reg.router.store.kind == "redis"
            assert reg.put(repo, value) == 201
        client = redis.Redis.from_url(url)
        positions = {ns: client.get(f"{ns}:{{repository:{repo}}}:lsn") for ns in ("team-a", "team-b", "team-c")}
        assert all(raw is not None for raw in positions.values()), positions
        assert from_key(positions["team-a"]) < from_key(positions["team-b"]) < from_key(positions["team-c"])
        for ns in ("team-a", "team-b", "team-c"):
            assert client.exists(f"{ns}:{{dbroute}}:epoch") and client.get(f"{ns}:{{dbroute}}:floor")
        assert not client.keys("regmw:*")
        assert a.router.store.get(repo).repository == from_key(positions["team-a"])
    finally:
        a.close()
        b.close()
        c.close()


# --- dead pooled connections are discarded quietly -----------------------------------------


def test_a_dead_pooled_connection_is_discarded_without_a_traceback(registry, cluster, caplog):
    """A connection whose backend died while checked out fails its reset rollback on return."""
    import logging

    engine = registry.router.primary.engine
    raw = engine.raw_connection()
    cursor = raw.cursor()
    cursor.execute("SELECT pg_backend_pid()")  # opens a transaction the return to the pool rolls back
    pid = cursor.fetchone()[0]
    cursor.close()
    cluster.sql("primary", "SELECT pg_terminate_backend(%s)", pid)
    cluster.wait_for(lambda: not cluster.sql("primary", "SELECT 1 FROM pg_stat_activity WHERE pid = %s", pid),
                     what="backend gone")
    with caplog.at_level(logging.DEBUG, logger="sqlalchemy.pool"):
        raw.close()
    noisy = [r for r in caplog.records if r.name.startswith("sqlalchemy") and r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]
    with engine.connect() as conn:  # the dead connection was not handed out again
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != pid
    assert registry.router.primary_state.up


# --- a replica connection dropped under a statement: the same policy on every interface ---------


def test_replica_dropped_mid_statement_orm_and_connection(registry, cluster):
    """The replica backend is terminated while a statement runs on it (in-process, no gunicorn).

    Nothing returned yet → the ORM query (through ``Session.execute``) and the
    connection's statement continue on the primary; a result already returned
    in the transaction → ``ReplicaLost``.
    """
    import threading

    from regmw_dbroute import ReplicaLost
    from sqlalchemy import BigInteger, Column, String, select
    from sqlalchemy.orm import declarative_base

    Base = declarative_base()

    class Kv(Base):
        __tablename__ = "kv"
        repo = Column(String, primary_key=True)
        value = Column(BigInteger)

    repo = unique("orm")
    cluster.sql("primary", "INSERT INTO kv (repo, value) VALUES (%s, 11)", repo)
    # kv as earlier tests (and autovacuum) may leave it: some rows and fresh statistics. The planner
    # then picks a sequential scan and may evaluate the sleep before ``repo = ...`` on every row.
    cluster.sql("primary", "INSERT INTO kv (repo, value) SELECT %s || g, g FROM generate_series(1, 50) g",
                unique("orm-filler") + "-")
    cluster.sql("primary", "ANALYZE kv")
    cluster.wait_replica_caught_up()
    slow = text("SELECT pg_sleep(5), inet_server_port()")

    def terminate_sleeper():
        cluster.wait_for(lambda: cluster.sql(
            "replica", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE query LIKE '%%pg_sleep(5)%%' AND application_name = 'regmw-replica'"),
            timeout=20, what="a slow read to terminate on the replica")

    def during_slow_read(run):
        killer = threading.Thread(target=terminate_sleeper)
        killer.start()
        try:
            return run()
        finally:
            killer.join(30)

    # ORM: nothing returned yet → the entity query runs again on the primary.
    handle = registry.router.route(repo, is_write=False)
    assert handle.role == "replica"
    session = handle.session()
    # An uncorrelated sub-select is an InitPlan: it sleeps once per statement whatever the plan, where a
    # bare ``pg_sleep(5)`` in WHERE can run once per scanned row (then the retry on the primary outlasts
    # statement_timeout: a slow statement, which is rightly not retried, not a lost connection).
    query = select(Kv).where(Kv.repo == repo, text("(SELECT pg_sleep(5)) IS NOT NULL"))
    assert during_slow_read(lambda: session.scalars(query).one()).value == 11
    assert handle.reason == "replica-failed" and handle.role == "primary"
    assert session.execute(text("SELECT inet_server_port()")).scalar() == cluster.primary_port
    session.expunge_all()
    assert session.get(Kv, repo).value == 11
    handle.close()

    # A connection whose transaction already returned a result → ReplicaLost, not a retry.
    handle = registry.router.route(repo, is_write=False)
    assert handle.role == "replica"
    conn = handle.connect()
    assert conn.execute(text("SELECT inet_server_port()")).scalar() == cluster.replica_port
    with pytest.raises(ReplicaLost):
        during_slow_read(lambda: conn.execute(slow).one())
    handle.close()

    # After commit() a new transaction has returned nothing: retried again.
    handle = registry.router.route(repo, is_write=False)
    conn = handle.connect()
    assert conn.execute(text("SELECT 1")).scalar() == 1
    conn.commit()
    assert during_slow_read(lambda: conn.execute(slow).one()[1]) == cluster.primary_port
    handle.close()


# --- a different server behind a replica's URL ------------------------------------------------


class SwitchableProxy:
    """A TCP relay on 127.0.0.1 whose target port can be switched; ``switch`` also cuts every relayed
    connection (the old server is gone, as when a replica is replaced behind its DNS name or pooler)."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.sockets: list = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.sockets += [client, upstream]
            for source, destination in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, destination), daemon=True).start()

    @staticmethod
    def _pump(source, destination) -> None:
        import socket

        while True:
            try:
                data = source.recv(65536)
                if not data:
                    break
                destination.sendall(data)
            except OSError:
                break
        for sock in (source, destination):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _cut(self) -> None:
        import socket

        with self._lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass

    def switch(self, target_port: int) -> None:
        self.target_port = target_port
        self._cut()

    def close(self) -> None:
        self.listener.close()
        self._cut()


def test_a_replica_replaced_behind_its_url_is_asked_before_it_serves_a_read(cluster, pg_second_replica):
    """The server behind a replica URL changes (replaced, restarted, a pooler in front of several):
    the cached replay position belongs to the OLD server, so a read needing a position must not be
    sent to the new one on that position's word."""
    fresh, lagging = pg_second_replica, cluster
    fresh.wait_caught_up()
    proxy = SwitchableProxy(fresh.port)
    config = db_config(cluster, health_interval=1.0, max_replay_lag=60.0, lsn_ttl=120.0, max_byte_lag=1 << 40)
    config["database"]["replicas"] = [f"postgresql+psycopg2://postgres@127.0.0.1:{proxy.port}/postgres"]
    reg = Registry(config)
    try:
        router = reg.router
        router.ensure_running()
        router.checker.stop()  # health rounds are run by hand below: no round may hide the window
        lagging.pause_replay()  # the server that will take over the URL replays nothing from now on
        repo = unique("replaced")
        assert reg.put(repo, 1) == 201
        position = router.store.get(repo).repository
        wait_replayed(cluster, fresh, position)
        router.check()  # the cached replay position (the fresh server's) covers the write
        assert router.replica_state().replay_lsn >= position
        answer = reg.get(repo)
        assert (answer["value"], answer["port"], answer["role"]) == (1, fresh.port, "replica"), answer

        proxy.switch(lagging.replica_port)  # the URL now reaches a server that lacks the write
        assert lagging.sql("replica", "SELECT value FROM kv WHERE repo = %s", repo) != [(1,)]
        for _ in range(3):
            answer = reg.get(repo)
            assert answer["value"] == 1, f"stale read from the server now behind the replica URL: {answer}"
            assert answer["port"] == cluster.primary_port, answer
        router.check()  # the checker learns the new server's position: the usual rule from then on
        assert router.replica_state().replay_lsn < position
        assert reg.get(repo)["reason"] == "replicas-behind"
    finally:
        reg.close()
        proxy.close()
