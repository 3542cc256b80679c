"""`regmw migrate` (enqueue, --dry-run, status), `regmw jobs status` and `regmw worker` on the embedded queue."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from regmw.cli import main

from .servers.migration_apps import seed

LAYOUT = "docker/registry/v2"


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "regmw.toml"
    path.write_text(f"""
[regmw]
plugins = ["migration"]
entry_points = false
[storage]
root = "{tmp_path}"
[migration]
old_root = "old/{LAYOUT}"
new_root = "new/{LAYOUT}"
[migration_job]
drain = 0
[jobs]
queue_path = "{tmp_path / 'jobs.sqlite3'}"
poll_interval = 0.05
""")
    return path


@pytest.fixture(autouse=True)
def hermetic(monkeypatch):
    import os

    for name in [name for name in os.environ if name.startswith("REGMW_")]:
        monkeypatch.delenv(name)


def test_dry_run_lists_files_and_blobs_and_enqueues_nothing(config, tmp_path, capsys):
    seeded = seed(str(tmp_path), "team/app", 1000)
    assert main(["migrate", "--dry-run", "team/app", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    hex_ = seeded.manifest_digest.split(":")[1]
    assert f"old/{LAYOUT}/blobs/sha256/{hex_[:2]}/{hex_}/data -> new/{LAYOUT}/blobs/sha256/" in out
    assert "_manifests/tags/v1/current/link" in out
    assert "team/app: 8 objects" in out  # 5 links (2 layers, revision, tag current + index) + 3 blobs
    assert main(["migrate", "status", "-c", str(config)]) == 0
    assert capsys.readouterr().out.strip() == "queued=0 running=0 done=0 failed=0"


def test_bad_names_are_refused_with_one_line(config, capsys):
    assert main(["migrate", "Bad..Name", "-c", str(config)]) == 2
    assert capsys.readouterr().err == "regmw: repository name does not match the distribution grammar: 'Bad..Name'\n"


def test_migrate_refuses_a_worker_that_would_lock_and_mark_where_no_request_sees_it(config, tmp_path, capsys):
    """Embedded locks and cache live in each process: a `regmw worker` migrating would hold nowhere."""
    seed(str(tmp_path), "team/app", 1000)
    assert main(["migrate", "team/app", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert "live inside each process" in err and "redis" in err
    assert main(["migrate", "status", "-c", str(config)]) == 0
    assert capsys.readouterr().out.strip() == "queued=0 running=0 done=0 failed=0"


def test_unknown_repositories_are_refused_and_nothing_is_enqueued(config, tmp_path, capsys):
    config.write_text(config.read_text().replace("[jobs]\n", "[jobs]\nrun_in_process = true\n"))
    seed(str(tmp_path), "team/app", 1000)
    assert main(["migrate", "team/app", "team/missing", "-c", str(config)]) == 2
    assert "no such repository" in capsys.readouterr().err
    assert main(["migrate", "status", "-c", str(config)]) == 0
    assert capsys.readouterr().out.strip() == "queued=0 running=0 done=0 failed=0"
    assert main(["migrate", "team/app", "-c", str(config)]) == 0
    assert capsys.readouterr().out.count("\tqueued\t") == 1


def test_a_worker_process_refuses_a_migration_its_lock_would_not_reach(config, tmp_path, capsys):
    """Enqueued through the API (not the CLI), the job itself refuses in a worker: nothing copied, nothing marked."""
    from regmw.runtime import build

    seed(str(tmp_path), "team/app", 1000)
    build(str(config), environ={}).services.jobs.enqueue("migrate-repository", repository="team/app")
    worker = subprocess.Popen([str(Path(sys.executable).parent / "regmw"), "worker", "-c", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert main(["migrate", "status", "-c", str(config)]) == 0
            out = capsys.readouterr().out
            if "serves no requests" in out:
                break
            time.sleep(0.05)
        assert "team/app\tqueued" in out and "ConfigError" in out, out
        assert not (tmp_path / "new").exists()
        assert main(["jobs", "status", "-c", str(config)]) == 0
        assert "migrate-repository" in capsys.readouterr().out
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(20)
    assert worker.returncode == 0


def test_a_worker_on_a_queue_it_cannot_open_fails_in_one_line(config, tmp_path):
    """Not runner threads dying with tracebacks while `regmw worker` exits 0 having run nothing."""
    (tmp_path / "a-file").write_text("")
    config.write_text(config.read_text().replace(str(tmp_path / "jobs.sqlite3"), str(tmp_path / "a-file" / "q.db")))
    result = subprocess.run([str(Path(sys.executable).parent / "regmw"), "worker", "-c", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"regmw: BackendUnavailable: job queue {tmp_path}/a-file/q.db "), result.stderr


def test_reading_commands_create_no_queue_file(config, tmp_path, capsys):
    """`jobs status`, `migrate status` and a refused `migrate` only read: no queue file appears (in the cwd, say)."""
    seed(str(tmp_path), "team/app", 1000)
    for argv in (["jobs", "status"], ["migrate", "status"], ["migrate", "--dry-run", "team/app"],
                 ["migrate", "team/missing"]):
        main([*argv, "-c", str(config)])
    assert "team/app: 8 objects" in capsys.readouterr().out
    assert not (tmp_path / "jobs.sqlite3").exists()


def test_regmw_serve_with_several_workers_refuses_a_migration_on_process_local_locks(config, tmp_path, capsys):
    """`[jobs] run_in_process` under `regmw serve` with 2 workers and no Redis: each worker has its own lock and
    "new" mark, so the job refuses (nothing copied) rather than leave the other worker writing to the old side."""
    import urllib.request

    from .servers._util import free_port, stop, wait_for_port

    config.write_text(config.read_text().replace("[jobs]\n", "[jobs]\nrun_in_process = true\n")
                      + "[serve]\nworkers = 2\n")
    seed(str(tmp_path), "team/app", 1000)
    assert main(["migrate", "team/app", "-c", str(config)]) == 0
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "regmw"), "serve", "-c", str(config), "--port",
                               str(port), "--registry-root", str(tmp_path / "served")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=server, timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # a request starts its worker's runner, which claims the job
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=10).close()
            assert main(["migrate", "status", "-c", str(config)]) == 0
            out = capsys.readouterr().out
            if "ConfigError" in out or "\tdone" in out:
                break
            time.sleep(0.1)
        assert "one of 2 serving processes" in out, out
        assert not (tmp_path / "new").exists()
    finally:
        stop(server)


def test_a_dry_run_of_a_missing_repository_is_refused_like_the_real_run(config, tmp_path, capsys):
    seed(str(tmp_path), "team/app", 1000)
    assert main(["migrate", "--dry-run", "team/app", "team/typo", "-c", str(config)]) == 2
    captured = capsys.readouterr()
    assert "no such repository" in captured.err and "team/typo" in captured.err and captured.out == ""
