"""`regmw check-config` refuses exactly what start-up refuses, with the same line, and connects nowhere unless asked."""
import re
import socket
from pathlib import Path

import pytest

from regmw import ConfigError, build
from regmw.cli import main

ROOT = Path(__file__).resolve().parent.parent
PG = 'primary = "postgresql://registry@127.0.0.1:1/registry"'  # loopback: a regression stays on this machine
PEM = """-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEqBeXtVh9kBLbUALRUmLfQnUfwmm3
MgeNPJMg5ew0rp6UcOPE+9wnb1lFuGGvb1W5pkyzsmyDrN9TQ0EpcN5Vjw==
-----END PUBLIC KEY-----"""

# (id, configuration, the start of the one line start-up refuses it with); every cross-field rule of the schema
REFUSED = [
    ("unknown-key", "[cache]\nmax_entrys = 5\n", "unknown key cache.max_entrys"),
    ("unknown-section", "[rdis]\nurl = 'redis://x'\n", "unknown section [rdis]"),
    ("bad-value", "[cache]\nmax_entries = 0\n", "cache.max_entries: must be at least 1"),
    ("unknown-plugin", "[regmw]\nplugins = ['nosuch']\n", "regmw.plugins: unknown plugin 'nosuch'"),
    ("not-toml", "not toml [", "not valid TOML"),
    ("old-without-new", "[gateway]\nold_upstream = 'http://old.example.com'\n",
     "gateway.new_upstream is required when the other of old_upstream/new_upstream is set"),
    ("new-without-old", "[gateway]\nnew_upstream = 'http://new.example.com'\n", "gateway.old_upstream is required"),
    ("key-and-key-file", "[auth]\nkey = 's'\nkey_file = '/etc/hostname'\nalgorithms = ['HS256']\n",
     "auth.key and auth.key_file are both set"),
    ("key-file-unreadable", "[auth]\nkey_file = '/nonexistent/key.pem'\n", "auth.key_file: cannot read /nonexistent/key.pem"),
    ("unknown-algorithm", "[auth]\nkey = 's'\nalgorithms = ['HS999']\n", "auth.algorithms: unsupported ['HS999']"),
    ("no-algorithm", "[auth]\nkey = 's'\nalgorithms = []\n", "auth.algorithms: unsupported empty list"),
    ("hmac-and-public-key", f"[auth]\nkey = '''{PEM}'''\nalgorithms = ['ES256', 'HS256']\n",
     "auth.algorithms: mixes HMAC (HS256) with public-key algorithms"),
    ("key-unusable", "[auth]\nkey = 'not a PEM'\nalgorithms = ['RS256', 'ES256']\n",
     "auth.key: not a usable key for any of RS256, ES256"),
    ("sentinel-without-service", "[regmw]\nplugins = ['redis']\n[redis]\nurl = 'redis+sentinel://127.0.0.1:1'\n",
     "redis.url: a redis+sentinel:// URL needs the master's service name"),
    ("service-name-without-sentinel", "[regmw]\nplugins = ['redis']\n[redis]\nservice_name = 'registry'\n",
     "redis.service_name is set but redis.url is not a redis+sentinel:// URL"),
    ("sentinel-password-without-sentinel", "[regmw]\nplugins = ['redis']\n[redis]\nsentinel_password = 'x'\n",
     "redis.sentinel_password is set but redis.url is not a redis+sentinel:// URL"),
    ("ca-file-without-tls", "[regmw]\nplugins = ['redis']\n[redis]\ntls_ca_file = '/etc/ssl/ca.pem'\n",
     "redis.tls_ca_file is set but redis.url does not use TLS"),
    ("script-with-sliding-window",
     "[regmw]\nplugins = ['redis']\n[ratelimit]\nstrategy = 'moving-window'\n"
     "[[ratelimit.rules]]\nby = 'client'\nlimit = '1/second'\n",
     "ratelimit.strategy 'moving-window' needs [redis] hot_path = \"limits\""),
    ("moving-window-embedded",  # a traceback per gunicorn worker and "Worker failed to boot" before
     "[ratelimit]\nstrategy = 'moving-window'\n[[ratelimit.rules]]\nby = 'client'\nlimit = '1/second'\n",
     "ratelimit.strategy 'moving-window' is not counted by the embedded rate limiter"),
    ("lsn-ttl-below-quarantine", f"[regmw]\nplugins = ['dbroute']\n[database]\n{PG}\nlsn_ttl = 30\n",
     "database.lsn_ttl: must exceed max_replay_lag + 3 × health_interval + connect_timeout (= 35s)"),
    ("store-url-never-read",
     f"[regmw]\nplugins = ['dbroute']\n[database]\n{PG}\nstore = 'memory'\nstore_url = 'redis://127.0.0.1:1'\n",
     'database.store_url is set but database.store = "memory" never reads it'),
    ("same-roots", "[regmw]\nplugins = ['migration']\n[migration]\nold_root = 'v2'\nnew_root = '/v2/'\n",
     "migration.new_root must differ from migration.old_root"),
    ("gcs-two-credentials",
     "[regmw]\nplugins = ['gcs']\n[gcs]\nbucket = 'b'\nanonymous = true\ncredentials_file = '/etc/hostname'\n",
     "gcs.anonymous and gcs.credentials_file are both set"),
    ("gcs-credentials-unreadable", "[regmw]\nplugins = ['gcs']\n[gcs]\nbucket = 'b'\ncredentials_file = '/nonexistent.json'\n",
     "gcs.credentials_file: cannot read /nonexistent.json"),
    ("webhook-to-metadata-service",
     "[regmw]\nplugins = ['notifications']\n[notifications]\n"
     "endpoints = [{name = 'ci', url = 'http://169.254.169.254/latest'}]\n",
     "notifications.endpoints[0]: 169.254.169.254 is an internal address"),
    ("wait-outlasting-the-socket",
     "[regmw]\nplugins = ['redis', 'notifications']\n[redis]\nsocket_timeout = 0.25\n"
     "[notifications]\nwait_replicas = 1\nwait_timeout = 0.25\n",
     "notifications.wait_timeout (0.25) must be below redis.socket_timeout (0.25)"),
    ("jobs-without-redis", "[regmw]\nplugins = ['jobs']\n",
     "the jobs plugin (dramatiq on Redis) needs the redis plugin"),
    ("migration-throttle-above-quarantine",
     f"[regmw]\nplugins = ['dbroute', 'db-migrations']\n[database]\n{PG}\nmax_replay_lag = 5\nlsn_ttl = 60\n"
     "[db_migrations]\nmax_replica_lag = 5\n",
     "db_migrations.max_replica_lag (5s) must be below database.max_replay_lag (5s)"),
    ("migrations-without-primary", "[regmw]\nplugins = ['db-migrations']\n",
     "db_migrations.primary is empty and no [database] section (plugin dbroute) names a primary"),
]


@pytest.fixture(autouse=True)
def hermetic_environment(monkeypatch):
    """The CLI reads the process environment (as start-up does); no REGMW_ variable of the caller may leak in."""
    import os

    for name in [name for name in os.environ if name.startswith("REGMW_")]:
        monkeypatch.delenv(name)


@pytest.mark.parametrize("text, message", [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED])
def test_check_config_refuses_what_start_up_refuses_with_the_same_line(tmp_path, capsys, text, message):
    path = tmp_path / "regmw.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as start_up:
        build(str(path), environ={})
    line = str(start_up.value)
    assert message in line and "\n" not in line
    for argv in (["check-config", str(path)], ["check-config", "--connect", str(path)]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.err == f"regmw: configuration error: {line}\n" and captured.out == ""


def test_every_cross_field_rule_has_a_case_in_the_table():
    """A new rule in the schema must join REFUSED (the table is the proof that check-config equals start-up)."""
    from regmw.plugins import BUILTIN_PLUGINS, load_plugins, make_manager
    from regmw.runtime import gather_sections

    pm = make_manager()
    load_plugins(pm, BUILTIN_PLUGINS, entry_points=False)
    rules = {check.__name__ for section in gather_sections(pm).values() for check in section.checks}
    assert rules == {"paired_upstreams", "check_auth", "url_and_options", "script_counts_fixed_windows",
                     "lsn_ttl_outlives_quarantine", "store_url_needs_redis_store", "roots_differ", "one_credential", "jobs_plugin_has_redis",
                     "endpoints_are_valid", "wait_fits_the_socket_timeout", "throttle_below_quarantine",
                     "primary_is_known", "embedded_counts_the_strategy"}


def test_a_sentinel_service_name_may_come_from_the_option_instead_of_the_url(tmp_path, capsys):
    path = tmp_path / "regmw.toml"
    path.write_text("[regmw]\nplugins = ['redis']\n[redis]\nurl = 'redis+sentinel://127.0.0.1:1'\n"
                    "service_name = 'registry'\n")
    assert main(["check-config", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: ok (redis)\n"


def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.setblocking(False)
    return server


def accepted(server) -> bool:
    """Whether anything connected: the kernel completes a handshake into the backlog even before accept()."""
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def test_check_config_connects_nowhere_without_connect(tmp_path, capsys):
    """Every backend of the configuration points at a listening loopback socket; none of them sees a connection."""
    redis, sentinel, database, gateway = (listener() for _ in range(4))
    try:
        port = {name: sock.getsockname()[1] for name, sock in
                {"redis": redis, "sentinel": sentinel, "database": database, "gateway": gateway}.items()}
        plain = tmp_path / "plain.toml"
        plain.write_text(
            f"[regmw]\nplugins = ['migration', 'redis', 'dbroute']\n[migration]\nnew_root = 'gitlab/v2'\n"
            f"[redis]\nurl = 'redis://127.0.0.1:{port['redis']}/0'\n"
            f"[database]\nprimary = 'postgresql://u@127.0.0.1:{port['database']}/db'\n"
            f"[gateway]\nupstream = 'http://127.0.0.1:{port['gateway']}'\n"
            "[[ratelimit.rules]]\nby = 'client'\nlimit = '100/second'\n")
        sentinel_config = tmp_path / "sentinel.toml"
        sentinel_config.write_text(
            f"[regmw]\nplugins = ['redis']\n[redis]\nurl = 'redis+sentinel://127.0.0.1:{port['sentinel']}/registry'\n")
        for path in (plain, sentinel_config):
            assert main(["check-config", str(path)]) == 0, capsys.readouterr().err
        assert not any(accepted(sock) for sock in (redis, sentinel, database, gateway))
        # The control: asked to connect, it does (so the assertion above could have failed).
        control = tmp_path / "control.toml"
        control.write_text(f"[regmw]\nplugins = ['redis']\n[redis]\nurl = 'redis://127.0.0.1:{port['redis']}/0'\n"
                           "socket_timeout = 0.01\nconnect_timeout = 0.01\nretries = 0\n")
        main(["check-config", "--connect", str(control)])
        assert accepted(redis)
    finally:
        for sock in (redis, sentinel, database, gateway):
            sock.close()


def test_check_config_of_the_readme_example_opens_no_socket(tmp_path, capsys, monkeypatch):
    """The README's example (hostnames under example.com) validates without resolving or dialling anything."""
    example = re.search(r"```toml\n# regmw.toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    path = tmp_path / "regmw.toml"
    path.write_text(example)
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("check-config must not touch the network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err
    assert attempts == []
    assert "ok (migration, gcs, redis)" in capsys.readouterr().out


def test_docs_and_readme_use_example_com_hosts_only():
    """No real or private address in an example a reader may paste (loopback is fine: it is the reader's own)."""
    private = re.compile(r"\b(10(\.\d{1,3}){3}|192\.168(\.\d{1,3}){2}|172\.(1[6-9]|2\d|3[01])(\.\d{1,3}){2})\b")
    url = re.compile(r"(?:https?|redis|rediss|postgresql)(?:\+sentinel)?://(?:[^@/\s\"'`]*@)?([A-Za-z0-9.,:\[\]-]+)")
    placeholders = {"127.0.0.1", "localhost", "host", "h", "h1", "h2", "h3", "..."}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        assert not private.search(text), f"{path.name}: {private.search(text).group(0)}"
        code = "\n".join(re.findall(r"```.*?```", text, re.S) + re.findall(r"`[^`\n]+`", text))
        for hosts in url.findall(code):
            for item in hosts.split(","):
                name = item.strip("[]").rpartition(":")[0] if ":" in item else item.strip("[]")
                assert name in placeholders or name.endswith(".example.com"), f"{path.name}: {hosts}"


# Refusals that depend on what the loaded plugins provide (a service), not on the file alone: the schema cannot
# see them, so `check-config` finds them with --connect, which runs the start-up itself.
REFUSED_BY_SERVICES = [
    ("redis-store-without-redis",  # loopback primary: should start-up ever reach the database, it stays on this machine
     "[regmw]\nplugins = ['dbroute']\n[database]\nprimary = 'postgresql://u@127.0.0.1:1/db'\nstore = 'redis'\n",
     "database.store: redis needs a shared Redis"),
]


@pytest.mark.parametrize("text, message", [case[1:] for case in REFUSED_BY_SERVICES],
                         ids=[case[0] for case in REFUSED_BY_SERVICES])
def test_check_config_connect_refuses_what_only_the_services_reveal(tmp_path, capsys, text, message):
    path = tmp_path / "regmw.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as start_up:
        build(str(path), environ={})
    assert message in str(start_up.value)
    assert main(["check-config", "--connect", str(path)]) == 2
    assert capsys.readouterr().err == f"regmw: configuration error: {start_up.value}\n"
