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
