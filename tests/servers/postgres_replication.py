"""A throwaway PostgreSQL 15 primary + streaming replica, owned by the test run.

postgres refuses to run as root, so every server command goes through
``runuser -u postgres --`` in a temp dir the postgres user owns (see
../shared/TESTING.md). The replica is made with ``pg_basebackup -R`` and
lags on demand through ``recovery_min_apply_delay``. Both servers listen on
free ports on 127.0.0.1 only and are stopped by ``pg_ctl`` (then by PID) at
teardown.

:class:`ReplicationCluster` is plain Python so the benchmark can use it too;
the ``pg_replication`` fixture is session-scoped (start-up costs ~1.5 s) and
``pg_cluster`` hands each test the same cluster restored to its baseline
(replica running, replaying, 200 ms apply delay). ``pg_second_replica`` adds
one more streaming replica of the same primary (:class:`ExtraReplica`, no
apply delay) for a single test, and removes it again at teardown.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ._util import free_port, unavailable

PG_BIN = Path(os.environ.get("REGMW_PG_BIN", "/usr/lib/postgresql/15/bin"))
BASELINE_DELAY = "200ms"


class ClusterUnavailable(RuntimeError):
    """The binaries or the postgres user are missing."""


class ReplicationCluster:
    """A primary and one streaming replica in a temp dir; ``start()``/``close()``."""

    def __init__(self, apply_delay: str = BASELINE_DELAY) -> None:
        if not (PG_BIN / "initdb").exists():
            raise ClusterUnavailable(f"PostgreSQL binaries not found in {PG_BIN}")
        if shutil.which("runuser") is None:
            raise ClusterUnavailable("runuser not on PATH")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            raise ClusterUnavailable("no postgres user") from None
        self.apply_delay = apply_delay
        self.root = Path(tempfile.mkdtemp(prefix="regmw-pg-"))
        shutil.chown(self.root, "postgres")
        self.primary_port = free_port()
        self.replica_port = free_port()
        self.primary_dir = self.root / "p"
        self.replica_dir = self.root / "r"
        self.extra_replicas: list[ExtraReplica] = []

    # --- urls -----------------------------------------------------------

    @property
    def primary_url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.primary_port}/postgres"

    @property
    def replica_url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.replica_port}/postgres"

    # --- lifecycle --------------------------------------------------------

    def _pg(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", str(PG_BIN / tool), *args],
            cwd=self.root, capture_output=True, text=True, check=check, timeout=120,
        )

    def start(self) -> ReplicationCluster:
        self._pg("initdb", "-D", str(self.primary_dir), "-A", "trust", "-U", "postgres", "--no-sync")
        self._append_conf(self.primary_dir, {
            "wal_level": "replica",
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.primary_port),
            "unix_socket_directories": f"'{self.root}'",
            "max_wal_senders": "5",
            "fsync": "off",
            "synchronous_commit": "on",
        })
        with open(self.primary_dir / "pg_hba.conf", "a") as hba:
            hba.write("host replication all 127.0.0.1/32 trust\n")
        self.start_server(self.primary_dir)
        self._pg("pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary_port), "-U", "postgres",
                 "-D", str(self.replica_dir), "-R", "-X", "stream")
        self._append_conf(self.replica_dir, {
            "port": str(self.replica_port),
            "recovery_min_apply_delay": f"'{self.apply_delay}'",
            "hot_standby_feedback": "on",
        })
        self.start_server(self.replica_dir)
        return self

    @staticmethod
    def _append_conf(datadir: Path, settings: dict[str, str]) -> None:
        with open(datadir / "postgresql.conf", "a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def start_server(self, datadir: Path) -> None:
        self._pg("pg_ctl", "-D", str(datadir), "-l", f"{datadir}.log", "-w", "-t", "30", "start")

    def stop_server(self, datadir: Path, mode: str = "fast") -> None:
        if (datadir / "postmaster.pid").exists():
            self._pg("pg_ctl", "-D", str(datadir), "-m", mode, "-w", "-t", "30", "stop", check=False)

    def replica_running(self) -> bool:
        return self._pg("pg_ctl", "-D", str(self.replica_dir), "status", check=False).returncode == 0

    def primary_running(self) -> bool:
        return self._pg("pg_ctl", "-D", str(self.primary_dir), "status", check=False).returncode == 0

    def stop_replica(self) -> None:
        self.stop_server(self.replica_dir, "immediate")

    def start_replica(self) -> None:
        if not self.replica_running():
            self.start_server(self.replica_dir)

    def stop_primary(self) -> None:
        self.stop_server(self.primary_dir, "immediate")

    def start_primary(self) -> None:
        if not self.primary_running():
            self.start_server(self.primary_dir)

    def add_replica(self, name: str, apply_delay: str = "0") -> ExtraReplica:
        """One more streaming replica of the primary (``pg_basebackup -R``), started."""
        replica = ExtraReplica(self, name, apply_delay)
        self.extra_replicas.append(replica)
        try:
            replica.start()
        except BaseException:
            replica.close()
            raise
        return replica

    def close(self) -> None:
        for replica in list(self.extra_replicas):
            replica.close()
        for datadir in (self.replica_dir, self.primary_dir):
            self.stop_server(datadir, "immediate")
            self._kill_leftover(datadir)
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _kill_leftover(datadir: Path) -> None:
        """If pg_ctl could not stop a server, kill it by the PID in its pid file."""
        pidfile = datadir / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass

    # --- SQL helpers --------------------------------------------------------

    def _connect(self, port: int, autocommit: bool = True):
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=5)
        conn.autocommit = autocommit
        return conn

    def sql(self, where: str | int, statement: str, *params) -> list[tuple]:
        """Run one statement on ``"primary"``, ``"replica"`` or a port; rows (or [])."""
        if isinstance(where, int):
            port = where
        else:
            port = self.primary_port if where == "primary" else self.replica_port
        conn = self._connect(port)
        try:
            with conn.cursor() as cur:
                cur.execute(statement, params or None)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def set_apply_delay(self, delay: str) -> None:
        """Change the replica's ``recovery_min_apply_delay`` at run time (ALTER SYSTEM + reload)."""
        self.sql("replica", f"ALTER SYSTEM SET recovery_min_apply_delay = '{delay}'")
        self.sql("replica", "SELECT pg_reload_conf()")
        self.wait_for(lambda: self.sql("replica", "SHOW recovery_min_apply_delay")[0][0] == _pg_interval(delay),
                      what=f"apply delay {delay}")

    def pause_replay(self) -> None:
        self.sql("replica", "SELECT pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        self.sql("replica", "SELECT pg_wal_replay_resume()")

    def wait_replica_caught_up(self, timeout: float = 30.0) -> None:
        """Poll until the replica has replayed everything the primary has written."""
        target = self.sql("primary", "SELECT pg_current_wal_lsn()::text")[0][0]
        self.wait_for(
            lambda: self.sql("replica", "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", target)[0][0],
            timeout, "replica catch-up",
        )

    @staticmethod
    def wait_for(predicate, timeout: float = 30.0, what: str = "condition", interval: float = 0.02) -> None:
        """Poll ``predicate`` until true, or fail after ``timeout`` (a deadline, not a timing sleep)."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except Exception as exc:  # noqa: BLE001 - the server may be starting
                last_error = exc
            time.sleep(interval)
        raise TimeoutError(f"{what} not reached after {timeout}s (last error: {last_error})")

    def restore_baseline(self) -> None:
        """Replica running and replaying with the baseline delay (what each test starts from)."""
        self.start_primary()
        self.start_replica()
        self.wait_for(lambda: self.sql("replica", "SELECT 1") == [(1,)], what="replica accepting connections")
        if self.sql("replica", "SELECT pg_is_wal_replay_paused()")[0][0]:
            self.resume_replay()
        if self.sql("replica", "SHOW recovery_min_apply_delay")[0][0] != _pg_interval(self.apply_delay):
            self.set_apply_delay(self.apply_delay)


class ExtraReplica:
    """Another streaming replica of a :class:`ReplicationCluster`'s primary.

    Made with ``pg_basebackup -R`` into the cluster's temp dir, listening on a
    free port on 127.0.0.1; ``close()`` stops it by ``pg_ctl`` (then by the PID
    in its pid file) and removes its data directory.
    """

    def __init__(self, cluster: ReplicationCluster, name: str, apply_delay: str = "0") -> None:
        self.cluster = cluster
        self.name = name
        self.apply_delay = apply_delay
        self.port = free_port()
        self.datadir = cluster.root / name

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> ExtraReplica:
        cluster = self.cluster
        cluster._pg("pg_basebackup", "-h", "127.0.0.1", "-p", str(cluster.primary_port), "-U", "postgres",
                    "-D", str(self.datadir), "-R", "-X", "stream", "-c", "fast")
        cluster._append_conf(self.datadir, {
            "port": str(self.port),
            "recovery_min_apply_delay": f"'{self.apply_delay}'",
            "hot_standby_feedback": "on",
        })
        cluster.start_server(self.datadir)
        cluster.wait_for(lambda: self.sql("SELECT pg_is_in_recovery()") == [(True,)],
                         what=f"replica {self.name} accepting connections")
        return self

    def close(self) -> None:
        self.cluster.stop_server(self.datadir, "immediate")
        self.cluster._kill_leftover(self.datadir)
        shutil.rmtree(self.datadir, ignore_errors=True)
        Path(f"{self.datadir}.log").unlink(missing_ok=True)
        if self in self.cluster.extra_replicas:
            self.cluster.extra_replicas.remove(self)

    def sql(self, statement: str, *params) -> list[tuple]:
        return self.cluster.sql(self.port, statement, *params)

    def pause_replay(self) -> None:
        self.sql("SELECT pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        self.sql("SELECT pg_wal_replay_resume()")

    def replay_lsn(self) -> int:
        """``pg_last_wal_replay_lsn()`` as an integer (the router's representation)."""
        return int(self.sql("SELECT pg_last_wal_replay_lsn() - '0/0'::pg_lsn")[0][0])

    def wait_caught_up(self, timeout: float = 30.0) -> None:
        """Poll until this replica has replayed everything the primary has written."""
        target = self.cluster.sql("primary", "SELECT pg_current_wal_lsn()::text")[0][0]
        self.cluster.wait_for(lambda: self.sql("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", target)[0][0],
                              timeout, f"replica {self.name} catch-up")


def _pg_interval(delay: str) -> str:
    """How SHOW prints a delay we set: ``200ms`` stays ``200ms``; ``3s`` stays ``3s``."""
    return delay


@pytest.fixture(scope="session")
def pg_replication():
    """A session-wide primary + streaming replica (:class:`ReplicationCluster`)."""
    try:
        cluster = ReplicationCluster()
    except ClusterUnavailable as exc:
        unavailable(str(exc))
    try:
        cluster.start()
    except (subprocess.SubprocessError, OSError) as exc:
        cluster.close()
        unavailable(f"cannot start a PostgreSQL primary + replica: {exc}")
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def pg_cluster(pg_replication):
    """The session cluster, restored to its baseline before and after the test."""
    pg_replication.restore_baseline()
    yield pg_replication
    pg_replication.restore_baseline()


@pytest.fixture
def pg_second_replica(pg_cluster):
    """A second streaming replica (no apply delay) of the session primary, for one test only."""
    replica = pg_cluster.add_replica("r2")
    try:
        yield replica
    finally:
        replica.close()
