"""The ``jobs`` plugin (dramatiq's Redis broker) on a real single Redis: key namespace, worker shutdown."""
from __future__ import annotations

import threading

import pytest
import redis

from regmw import build
from regmw.errors import ConfigError
from regmw.jobs import Job, JobContext
from regmw.plugins import hookimpl

pytestmark = pytest.mark.services


class Waiter:
    """A test plugin: job ``wait`` waits for its ``context.stop`` (at most ``seconds``) and says whether it was set."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.stopped: list[bool] = []

    @hookimpl
    def regmw_jobs(self, config):
        def run(context: JobContext, seconds: float) -> None:
            self.started.set()
            self.stopped.append(context.stop.wait(seconds))

        return [Job("wait", run, max_retries=0)]


def _runtime(url: str, namespace: str, plugin=None, jobs: dict | None = None):
    config = {"regmw": {"plugins": ["redis", "jobs"], "entry_points": False},
              "redis": {"url": url, "namespace": namespace}, "jobs": jobs or {}}
    return build(config, environ={}, plugins=[plugin or Waiter()])


def test_the_queue_lives_under_the_redis_namespace_so_two_deployments_never_share_it(redis_server):
    """`[redis] namespace` prefixes every key regmw writes: two deployments on one Redis, each its own queue."""
    _, url = redis_server
    staging, production = _runtime(url, "staging"), _runtime(url, "production")
    job_id = staging.services.jobs.enqueue("wait", seconds=0)
    assert [record.id for record in staging.services.jobs.status()] == [job_id]
    assert production.services.jobs.status() == []  # production's workers never run staging's job
    keys = [key.decode() for key in redis.Redis.from_url(url).scan_iter(count=1000)]
    assert keys and all(key.startswith("staging") for key in keys), keys


@pytest.mark.parametrize("namespace", ["", " ", "two words"])
def test_a_jobs_namespace_that_would_not_namespace_is_refused(redis_server, namespace):
    _, url = redis_server
    with pytest.raises(ConfigError, match="jobs.namespace: must be non-empty"):
        _runtime(url, "regmw", jobs={"namespace": namespace})


def test_a_running_job_sees_the_worker_stop(redis_server):
    """`context.stop` is set when the worker shuts down (SIGTERM), as on the embedded queue (docs/jobs.md)."""
    _, url = redis_server
    waiter = Waiter()
    queue = _runtime(url, "stopping", waiter).services.jobs
    queue.enqueue("wait", seconds=60)
    stop = threading.Event()
    worker = threading.Thread(target=queue.work, args=(stop, 1), daemon=True)
    worker.start()
    assert waiter.started.wait(30), "the job did not start"
    stop.set()
    worker.join(30)
    assert not worker.is_alive() and waiter.stopped == [True]



def test_a_job_that_kills_its_worker_every_time_is_dead_lettered_not_run_forever(redis_server, tmp_path):
    """dramatiq requeues a dead worker's message without counting a retry; regmw counts starts and gives up."""
    import subprocess
    import sys
    import time

    from .test_jobs_embedded import killer_env

    _, url = redis_server
    config = tmp_path / "regmw.toml"
    config.write_text(f'[regmw]\nplugins = ["redis", "jobs", "tests.job_killer"]\nentry_points = false\n'
                      f'[redis]\nurl = "{url}"\nnamespace = "killer"\n'
                      '[jobs]\nheartbeat_timeout = 1\nmaintenance_chance = 1.0\n')
    runs = tmp_path / "runs"
    queue = build(str(config), environ={}).services.jobs
    queue.enqueue("killer")
    worker = None
    try:
        deadline = time.monotonic() + 90
        while queue.status("killer")[0].state != "failed":
            assert time.monotonic() < deadline, f"{queue.status('killer')}, runs: {runs.read_text().split()}"
            if worker is None or worker.poll() is not None:  # the last one was killed by the job: start another
                worker = subprocess.Popen([sys.executable, "-m", "regmw.cli", "-c", str(config), "worker"],
                                          env=killer_env(runs), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.1)  # polling the record, not timing: the loop ends on its state
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            worker.wait(30)
    (record,) = queue.status("killer")
    assert record.attempts == 3 and "without an outcome" in record.error, record
    assert runs.read_text().split() == ["1", "1"]  # two starts (dramatiq's attempt stays 1), the third gives up
    assert queue.client.zcard(f"{queue.namespace}:regmw.XQ") == 1  # in dramatiq's dead letters, as failed jobs are
    assert not queue.client.exists(f"{queue.namespace}:regmw:starts")  # its start count is gone with its outcome


def test_records_of_finished_jobs_are_deleted_after_keep_finished(redis_server):
    """A finished job's record (and its entry in `<ns>:regmw:finished`) goes `keep_finished` seconds later."""
    import time

    _, url = redis_server

    def run(queue, **kwargs) -> str:
        job_id = queue.enqueue("wait", seconds=0, **kwargs)
        stop = threading.Event()
        worker = threading.Thread(target=queue.work, args=(stop, 1), daemon=True)
        worker.start()
        deadline = time.monotonic() + 30
        while {record.id: record.state for record in queue.status("wait")}.get(job_id) != "done":
            assert time.monotonic() < deadline, queue.status("wait")
            time.sleep(0.05)  # polling the record: the loop ends on its state
        stop.set()
        worker.join(30)
        return job_id

    jobs = {"keep_finished": 3600}
    first = _runtime(url, "pruned", jobs=jobs).services.jobs
    old, kept = run(first), run(first)
    first.client.zadd(f"{first.namespace}:regmw:finished", {old: time.time() - 7200})  # `old` finished 2 h ago
    second = _runtime(url, "pruned", jobs=jobs).services.jobs  # another process: it has not looked yet
    fresh = run(second)
    assert sorted(record.id for record in second.status("wait")) == sorted([kept, fresh])
    assert sorted(second.client.zrange(f"{second.namespace}:regmw:finished", 0, -1)) == sorted(
        [kept.encode(), fresh.encode()])


def test_a_job_the_broker_refuses_leaves_no_queued_record(redis_server):
    """`enqueue` raises when dramatiq cannot queue the message; no record claims it is queued."""
    _, url = redis_server
    queue = _runtime(url, "refusing").services.jobs
    queue.client.set(f"{queue.namespace}:regmw.msgs", "not a hash")  # dramatiq's script now fails: WRONGTYPE
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        queue.enqueue("wait", seconds=0)
    assert queue.status("wait") == []
