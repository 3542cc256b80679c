"""The repository migration job on the filesystem layout, run by the embedded SQLite queue.

A real registry app (the reference registry, old and new roots) behind the
real middleware over HTTP; the job goes through the contract only. Crashes are
injected at each step by a storage / event sink that fails on demand, and the
repository must stay readable and be either old or new, never half.
"""
from __future__ import annotations

import os
import threading
import time

import pytest
from werkzeug.serving import make_server

from regmw import RegistryMiddleware, hookimpl
from regmw.defaults.filesystem import FilesystemStorage
from regmw.demo.client import DemoClient
from regmw.demo.registry import create_app
from regmw_migration.migrate import EVENT_ACTION, JOB_NAME, event_id, state_key

LAYOUT = "docker/registry/v2"


class Crash(BaseException):
    """A crash: not an Exception, so nothing on the way catches it (as SIGKILL would not be)."""


class FaultyStorage(FilesystemStorage):
    """The filesystem storage, failing the Nth copy on demand, or running a hook before a copy."""

    crash_at: int | None = None
    before_copy = None

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.copies = 0

    def copy(self, src: str, dst: str) -> None:
        self.copies += 1
        if self.before_copy is not None:
            hook, self.before_copy = self.before_copy, None
            hook()
        if self.crash_at is not None and self.copies >= self.crash_at:
            self.crash_at = None
            raise Crash(f"crash at copy {self.copies}")
        super().copy(src, dst)


class Recorder:
    """An event sink recording what it is given; ``fail_next = ACTION`` makes the next such emit crash."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.fail_next: str | None = None

    def emit(self, event: dict) -> None:
        if self.fail_next == event["action"]:
            self.fail_next = None
            raise Crash("crash while emitting")
        self.events.append(event)


class Harness:
    def __init__(self, root: str) -> None:
        self.root = root
        self.recorder = Recorder()
        self.storage = FaultyStorage(root)
        test = self

        class Plugin:
            @hookimpl
            def regmw_storage(self, config):
                return test.storage

            @hookimpl
            def regmw_event_sink(self, config, services):
                return test.recorder

        config = {
            "regmw": {"plugins": ["migration"], "entry_points": False},
            "storage": {"root": root},
            "migration": {"old_root": f"old/{LAYOUT}", "new_root": f"new/{LAYOUT}", "old_ttl": 300},
            "migration_job": {"drain": 0, "lock_ttl": 5},
            "jobs": {"queue_path": os.path.join(root, "jobs.sqlite3"), "run_in_process": False, "min_backoff": 0},
        }
        self.config = config
        apps = {"old": create_app(os.path.join(root, "old")), "new": create_app(os.path.join(root, "new"))}
        self.middleware = RegistryMiddleware(apps["old"], config, apps=apps, plugins=[Plugin()], environ={})
        self.services = self.middleware.services
        self.server = make_server("127.0.0.1", 0, self.middleware, threaded=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.client = DemoClient("127.0.0.1", self.server.server_port)

    def run_jobs(self) -> None:
        """Run every ready job once (crashes propagate, as a dying process would stop)."""
        stop = threading.Event()
        while self.services.jobs.run_one(stop):
            pass

    def path(self, repository: str) -> str | None:
        answer = self.client.request("GET", f"/v2/{repository}/tags/list")
        return answer.headers.get("regmw-migration-path")

    def tree(self, side: str, repository: str) -> dict[str, bytes]:
        top = os.path.join(self.root, side, LAYOUT, "repositories", repository)
        out = {}
        for folder, _, files in os.walk(top):
            for name in files:
                path = os.path.join(folder, name)
                out[os.path.relpath(path, top)] = open(path, "rb").read()
        return {k: v for k, v in out.items() if not k.startswith("_uploads")}

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def harness(tmp_path):
    h = Harness(str(tmp_path))
    yield h
    h.close()


def push(harness: Harness, repository: str, layer: bytes, tag: str = "v1") -> None:
    answers = harness.client.push_image(repository, tag, layer)
    assert [a.status for a in answers] == [201] * len(answers), [a.body for a in answers]


def test_migrates_repositories_sharing_a_blob_and_announces_each_once(harness):
    shared = os.urandom(50_000)
    for name in ("team/a", "team/b", "team/c"):
        push(harness, name, shared + name.encode())
        push(harness, name, shared, tag="shared")
    before = {name: harness.tree("old", name) for name in ("team/a", "team/b", "team/c")}
    assert harness.path("team/a") == "old"
    harness.services.jobs.enqueue(JOB_NAME, repository="team/a")
    harness.services.jobs.enqueue(JOB_NAME, repository="team/b")
    harness.services.jobs.enqueue(JOB_NAME, repository="team/c")
    harness.run_jobs()
    for name in ("team/a", "team/b", "team/c"):
        assert harness.path(name) == "new"
        assert harness.tree("new", name) == before[name]
        assert harness.client.pull_layer(name, "v1") == shared + name.encode()
        assert harness.client.pull_layer(name, "shared") == shared
        assert not harness.services.locks.read_only(name)
    # per repository, in order: locked (writes refused from here), migrated, unlocked (writes go to new)
    assert [(e["action"], e["target"]["repository"]) for e in harness.recorder.events] == [
        (action, name) for name in ("team/a", "team/b", "team/c") for action in ("locked", EVENT_ACTION, "unlocked")]
    assert len({e["id"] for e in harness.recorder.events}) == 9
    assert {r.state for r in harness.services.jobs.status(JOB_NAME)} == {"done"}
    # a second request to migrate is a no-op: no copy, no second event
    copies = harness.storage.copies
    harness.services.jobs.enqueue(JOB_NAME, repository="team/a")
    harness.run_jobs()
    assert harness.storage.copies == copies and len(harness.recorder.events) == 9
    # the new side takes writes after the migration
    push(harness, "team/a", b"after", tag="v2")
    assert harness.client.pull_layer("team/a", "v2") == b"after"


@pytest.mark.parametrize("crash_at", [1, 3, 6])
def test_a_crash_mid_copy_leaves_the_repository_old_and_a_rerun_finishes(harness, crash_at):
    push(harness, "crash/app", os.urandom(20_000))
    push(harness, "crash/app", os.urandom(20_000), tag="v2")
    before = harness.tree("old", "crash/app")
    harness.storage.crash_at = crash_at
    harness.services.jobs.enqueue(JOB_NAME, repository="crash/app")
    with pytest.raises(Crash):
        harness.run_jobs()
    # the process "died" holding the lock: reads still work, from the old side, complete
    assert harness.path("crash/app") == "old"
    assert harness.client.pull_layer("crash/app", "v2") is not None
    write = harness.client.push_image("crash/app", "v3", b"during")[0]
    assert write.status == 503 and write.error_code == "UNAVAILABLE" and "retry-after" in write.headers
    # the rerun waits for the dead run's lock, then starts over
    lock = harness.services.jobs.get_state(state_key("crash/app"))
    assert lock["phase"] == "locked"
    harness.services.locks.clear_read_only("crash/app", lock["owner"])  # its TTL ran out (in effect)
    harness.services.jobs._finish(harness.services.jobs.status(JOB_NAME)[0].id, "queued")  # its job lease ran out
    harness.run_jobs()
    assert harness.path("crash/app") == "new"
    assert harness.tree("new", "crash/app") == before
    # the dead run announced its lock but never an unlock; the rerun: locked, migrated (its fixed id), unlocked
    assert [e["action"] for e in harness.recorder.events] == ["locked", "locked", EVENT_ACTION, "unlocked"]
    assert [e["id"] for e in harness.recorder.events if e["action"] == EVENT_ACTION] == [
        event_id("crash/app", f"new/{LAYOUT}")]


def test_a_rerun_while_the_dead_runs_lock_is_held_is_retried_not_run(harness):
    push(harness, "wait/app", b"x" * 1000)
    harness.storage.crash_at = 1
    harness.services.jobs.enqueue(JOB_NAME, repository="wait/app")
    with pytest.raises(Crash):
        harness.run_jobs()
    job = harness.services.jobs.status(JOB_NAME)[0]
    harness.services.jobs._finish(job.id, "queued")
    assert harness.services.jobs.run_one(threading.Event())
    record = harness.services.jobs.status(JOB_NAME)[0]
    assert record.state == "queued" and "RetryLater" in record.error
    assert harness.path("wait/app") == "old"


def test_a_crash_after_the_mark_is_finished_by_the_rerun_with_the_same_event(harness):
    push(harness, "late/app", b"y" * 3000)
    harness.recorder.fail_next = EVENT_ACTION
    harness.services.jobs.enqueue(JOB_NAME, repository="late/app")
    with pytest.raises(Crash):
        harness.run_jobs()
    assert harness.path("late/app") == "new"  # marked, verified before
    assert harness.services.jobs.get_state(state_key("late/app"))["phase"] == "marked"
    harness.services.jobs._finish(harness.services.jobs.status(JOB_NAME)[0].id, "queued")
    harness.run_jobs()
    # the crashed emit delivered nothing; the rerun from "marked" announces once, then the unlock
    assert [e["action"] for e in harness.recorder.events] == ["locked", EVENT_ACTION, "unlocked"]
    assert harness.services.jobs.get_state(state_key("late/app"))["phase"] == "done"
    assert harness.client.pull_layer("late/app", "v1") == b"y" * 3000


def test_writes_during_the_copy_are_refused_with_retry_after(harness):
    push(harness, "busy/app", b"z" * 3000)
    answers = []
    harness.storage.before_copy = lambda: answers.extend(harness.client.push_image("busy/app", "v2", b"w"))
    harness.services.jobs.enqueue(JOB_NAME, repository="busy/app")
    harness.run_jobs()
    assert answers[0].status == 503 and answers[0].headers.get("retry-after", "").isdigit()
    assert harness.path("busy/app") == "new"
    assert harness.client.pull_layer("busy/app", "v1") == b"z" * 3000


def test_a_late_write_on_the_old_side_is_copied_by_a_second_pass(harness):
    push(harness, "late2/app", b"q" * 100)
    root = os.path.join(harness.root, "old", LAYOUT, "repositories", "late2/app", "_manifests", "tags", "extra")

    def late_write():  # a write admitted before the lock, finishing during the copy
        os.makedirs(os.path.join(root, "current"))
        with open(os.path.join(root, "current", "link"), "w") as handle:
            handle.write(harness.tree("old", "late2/app")["_manifests/tags/v1/current/link"].decode())

    harness.storage.before_copy = late_write
    harness.services.jobs.enqueue(JOB_NAME, repository="late2/app")
    harness.run_jobs()
    assert harness.tree("new", "late2/app") == harness.tree("old", "late2/app")
    assert "_manifests/tags/extra/current/link" in harness.tree("new", "late2/app")


def test_a_child_repository_is_not_migrated_with_its_parent(harness):
    push(harness, "nest/app", b"parent" * 100)
    push(harness, "nest/app/child", b"child" * 100)
    harness.services.jobs.enqueue(JOB_NAME, repository="nest/app")
    harness.run_jobs()
    assert harness.path("nest/app") == "new" and harness.path("nest/app/child") == "old"
    assert not os.path.exists(os.path.join(harness.root, "new", LAYOUT, "repositories", "nest/app/child"))
    assert harness.client.pull_layer("nest/app/child", "v1") == b"child" * 100


def test_a_worker_without_shared_locks_and_cache_refuses_and_copies_nothing(harness):
    """In a process that serves no requests (`regmw worker`), a process-local lock and mark would hold nowhere."""
    from regmw.errors import ConfigError
    from regmw.jobs import JobContext
    from regmw.runtime import build
    from regmw_migration.migrate import migrate_repository

    push(harness, "solo/app", b"s" * 500)
    worker = build(harness.config, environ={})  # the same configuration, in a process serving nothing
    assert not getattr(worker.services, "serving", False) and not worker.services.locks.shared
    with pytest.raises(ConfigError, match="serves no requests"):
        migrate_repository(JobContext(worker.services, "job-1", JOB_NAME), "solo/app")
    assert harness.tree("new", "solo/app") == {} and not harness.services.locks.read_only("solo/app")
    assert worker.services.jobs.get_state(state_key("solo/app")) is None
    assert harness.path("solo/app") == "old"
    assert harness.client.push_image("solo/app", "v2", b"still writable")[-1].status == 201


def test_a_repository_only_under_the_new_root_is_a_no_op_and_a_missing_one_fails_unlocked(harness, monkeypatch):
    # a new repository: created under the new root (as a flagged push would)
    new_app = os.path.join(harness.root, "new", LAYOUT, "repositories", "fresh/app", "_manifests", "tags", "v1")
    os.makedirs(os.path.join(new_app, "current"))
    with open(os.path.join(new_app, "current", "link"), "w") as handle:
        handle.write("sha256:" + "0" * 64)
    assert harness.path("fresh/app") == "new"
    taken = []
    original = harness.services.locks.set_read_only
    monkeypatch.setattr(harness.services.locks, "set_read_only",
                        lambda repository, *a, **k: taken.append(repository) or original(repository, *a, **k))
    harness.services.jobs.enqueue(JOB_NAME, repository="fresh/app")
    harness.services.jobs.enqueue(JOB_NAME, repository="no/such")
    harness.run_jobs()
    records = {r.kwargs["repository"]: r for r in harness.services.jobs.status(JOB_NAME)}
    assert records["fresh/app"].state == "done"
    assert records["no/such"].state == "failed" and "no such repository" in records["no/such"].error
    # neither took the read-only lock (writes to a repository being created are not refused) nor announced
    assert taken == [] and harness.recorder.events == [] and harness.storage.copies == 0
    assert harness.path("fresh/app") == "new"


def test_a_drain_close_to_the_lock_ttl_keeps_the_lock(harness, monkeypatch):
    """The lock is renewed while the run drains: a drain of most of lock_ttl must not stop every run (LeaseLost)."""
    push(harness, "drain/app", b"d" * 500)
    monkeypatch.setitem(harness.services.config["migration_job"], "lock_ttl", 1)
    monkeypatch.setitem(harness.services.config["migration_job"], "drain", 0.9)  # > 2/3 of lock_ttl
    harness.services.jobs.enqueue(JOB_NAME, repository="drain/app")
    harness.run_jobs()
    (record,) = harness.services.jobs.status(JOB_NAME)
    assert record.state == "done", record.error
    assert harness.path("drain/app") == "new"


def test_a_verification_longer_than_the_lock_ttl_renews_the_lock(harness, monkeypatch):
    """Hashing every object of a large repository may outlast lock_ttl: the run renews between objects."""
    import types

    from regmw_migration import migrate

    push(harness, "hash/app", b"h" * 500)
    skew = [0.0]  # each digest "takes" a quarter of lock_ttl (a large object hashed), on the run's clock
    monkeypatch.setattr(migrate, "time", types.SimpleNamespace(monotonic=lambda: time.monotonic() + skew[0]))
    digest = harness.storage.digest

    def slow_digest(key):
        skew[0] += 0.25 * 5
        return digest(key)

    monkeypatch.setattr(harness.storage, "digest", slow_digest)
    harness.services.jobs.enqueue(JOB_NAME, repository="hash/app")
    harness.run_jobs()
    (record,) = harness.services.jobs.status(JOB_NAME)
    assert record.state == "done", record.error
    assert harness.path("hash/app") == "new" and skew[0] > 5  # the verification outlasted lock_ttl


def test_a_worker_stopping_mid_copy_releases_the_lock_at_once_and_the_job_is_retried(harness):
    """SIGTERM (context.stop) mid-copy: the run stops at its next check and unlocks, not after lock_ttl."""
    push(harness, "stop/app", b"s" * 2000)
    stop = threading.Event()
    harness.storage.before_copy = stop.set  # the worker is told to stop during the first copy
    harness.services.jobs.enqueue(JOB_NAME, repository="stop/app")
    assert harness.services.jobs.run_one(stop)
    (record,) = harness.services.jobs.status(JOB_NAME)
    assert record.state == "queued" and "worker stopping" in record.error, record
    assert not harness.services.locks.read_only("stop/app") and harness.path("stop/app") == "old"
    assert [e["action"] for e in harness.recorder.events] == ["locked", "unlocked"]
    harness.run_jobs()  # another worker's turn
    assert harness.path("stop/app") == "new"


def test_a_write_acknowledged_while_the_lock_lapsed_before_the_mark_is_copied_after_it(harness, monkeypatch):
    """The run stalls longer than lock_ttl between its last check and the mark: the lock lapses, a push is
    admitted and acknowledged on the old side; after the mark the run copies what the new side lacks."""
    import types

    from regmw_migration import migrate

    push(harness, "stall/app", b"s" * 500)
    skew = [0.0]
    monkeypatch.setattr(migrate, "time", types.SimpleNamespace(monotonic=lambda: time.monotonic() + skew[0]))
    set_state, answers = harness.services.jobs.set_state, []

    def stalled_set_state(key, value, token):
        if value.get("phase") == "marked" and not answers:  # after the run's last check, before the mark
            skew[0] += 6  # the process stalled past lock_ttl (5 s) ...
            harness.services.locks.clear_read_only("stall/app", value["owner"])  # ... so its lock expired
            answers.extend(harness.client.push_image("stall/app", "during-lapse", b"L" * 700))
        return set_state(key, value, token)

    monkeypatch.setattr(harness.services.jobs, "set_state", stalled_set_state)
    harness.services.jobs.enqueue(JOB_NAME, repository="stall/app")
    harness.run_jobs()
    assert [a.status for a in answers] == [201, 201, 201]  # acknowledged: the repository was old and unlocked
    assert harness.path("stall/app") == "new"
    assert harness.client.pull_layer("stall/app", "during-lapse") == b"L" * 700  # not lost
    assert harness.client.pull_layer("stall/app", "v1") == b"s" * 500
