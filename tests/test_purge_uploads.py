"""The periodic purge of stale upload sessions on the filesystem layout, run through the periodic runner."""
from __future__ import annotations

import os
import threading
import time

import pytest

import regmw
from regmw.jobs import JobContext, LeaseLost, PeriodicRunner, collect_jobs
from regmw.backends import Lease
from regmw.defaults.purge import purge

ROOT = "docker/registry/v2"


def session(base, repository: str, upload: str, age: float) -> str:
    folder = os.path.join(base, ROOT, "repositories", repository, "_uploads", upload)
    os.makedirs(folder)
    for name in ("data", "startedat"):
        with open(os.path.join(folder, name), "w") as handle:
            handle.write("x")
    then = time.time() - age
    os.utime(os.path.join(folder, "startedat"), (then, then))
    return folder


@pytest.fixture
def runtime(tmp_path):
    return regmw.build({
        "regmw": {"entry_points": False}, "storage": {"root": str(tmp_path)},
        "jobs": {"queue_path": str(tmp_path / "jobs.sqlite3"), "run_in_process": False},
        "purge_uploads": {"enabled": True, "max_age": 3600, "every": 60, "instances": 1},
    }, environ={})


def test_the_periodic_purge_removes_stale_sessions_only(runtime, tmp_path):
    stale = session(tmp_path, "a/app", "u-old", 7200)
    fresh = session(tmp_path, "a/app", "u-new", 10)
    other = session(tmp_path, "b", "u-old2", 7200)
    link = os.path.join(tmp_path, ROOT, "repositories", "a/app", "_layers", "sha256", "ab", "link")
    os.makedirs(os.path.dirname(link))
    open(link, "w").close()
    jobs = collect_jobs(runtime.config, runtime.pm)
    runner = PeriodicRunner(runtime.services, jobs.values(), threading.Event())
    assert runner.run_once(jobs["purge-uploads"])
    assert not os.path.exists(stale) and not os.path.exists(other)
    assert os.path.exists(fresh) and os.path.exists(link)


def test_a_holder_that_lost_its_slot_deletes_nothing(runtime, tmp_path):
    stale = session(tmp_path, "a/app", "u-old", 7200)
    lost = threading.Event()
    lost.set()
    context = JobContext(runtime.services, "x", "purge-uploads", lease=Lease("purge-uploads", "me", 7, 30.0, lost))
    with pytest.raises(LeaseLost):
        purge(context, [ROOT], 3600)
    assert os.path.exists(os.path.join(stale, "startedat")) and os.path.exists(os.path.join(stale, "data"))


def test_the_slot_caps_concurrent_runs(runtime):
    jobs = collect_jobs(runtime.config, runtime.pm)
    job = jobs["purge-uploads"]
    with runtime.services.locks.cluster_slot(job.name, job.instances, job.lease_ttl):
        assert not PeriodicRunner(runtime.services, [job], threading.Event()).run_once(job)
