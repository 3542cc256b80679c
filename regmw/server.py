"""``regmw serve`` on gunicorn: threaded workers, metrics of every worker, graceful shutdown.

Why these choices (measured in docs/performance.md, benchmarks/gateway_bench.py):

* **gunicorn, ``gthread`` workers.** A blob transfer holds one thread for
  minutes; with the sync worker it would also hold the worker's heartbeat, and
  ``timeout`` would kill a long pull. Threads stream; the worker's main loop
  keeps beating. ``[serve] workers`` processes × ``threads`` threads.
* **Graceful shutdown that refuses.** On SIGTERM gunicorn stops accepting,
  lets in-flight requests finish for ``graceful_timeout`` seconds, then kills.
  But its workers keep the shared listening socket open while they drain, so
  the kernel would still complete new handshakes into the backlog and leave
  those clients hanging. :class:`Arbiter` therefore ``shutdown()``\\ s the
  listening sockets first: from then on a new connection is refused
  (ECONNREFUSED) and a load balancer moves on at once, while connections
  already accepted stream to the end. Only a full stop does this; a reload
  (SIGHUP) or fewer workers (TTOU) keeps listening.
* **Metrics across workers.** prometheus-client's multiprocess mode must be
  chosen before it is imported, and ``regmw`` imports it; so :func:`run`
  creates a fresh ``PROMETHEUS_MULTIPROC_DIR`` and re-executes itself
  (``python -m regmw.server``, same PID) with it set. The master answers
  ``[serve] metrics_listen`` with every worker's values summed; a dead worker's
  counters stay counted. The directory is removed when the server exits.
* **The app is built in each worker** (after fork): Redis pools, database
  health threads and upstream pools must not be shared across processes. The
  master validates the configuration and builds the app once in a forked
  child (:func:`trial_build`), so a bad one fails as one line (exit 2) before
  any worker starts. Workers build from the file as the
  master read it (at start or at the last reload), never from a later edit.
"""
from __future__ import annotations

import argparse
import errno
import glob
import logging
import os
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import traceback
from collections.abc import Sequence
from typing import Any

from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter as _GunicornArbiter
from gunicorn.errors import AppImportError
from gunicorn.http.errors import (
    ChunkMissingTerminator,
    InvalidChunkExtension,
    InvalidChunkSize,
    InvalidResponseHeader,
    InvalidResponseHeaderName,
    ParseException,
)
from gunicorn.workers.gthread import ThreadWorker

from . import accesslog
from .config import load_toml
from .errors import ConfigError, error_body, exception_line, status_phrase

log = logging.getLogger("regmw.server")

#: What gunicorn's workers handle (Worker.init_signals): blocked from fork until those handlers are set.
WORKER_SIGNALS = frozenset({signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGUSR1, signal.SIGWINCH,
                            signal.SIGABRT})

_OWNED_DIR = "REGMW_SERVE_METRICS_DIR"  # set when this server created PROMETHEUS_MULTIPROC_DIR (and removes it)


class DrainingWorker(ThreadWorker):
    """gunicorn's threaded worker, tolerating a listening socket the master already shut down.

    It also answers what gunicorn refuses before the application sees a request
    (a malformed request line or method, a bad Content-Length or chunk size, a
    header too large: 400, 414, 417, 431) with an OCI error body instead of
    gunicorn's HTML page, as every other refusal regmw makes, and gives each
    such request its access log line (``refusal: "invalid"``) and its count in
    ``regmw_refusals_total``: probes the middleware never saw stay visible.
    And it bounds how long a client may stall (``[serve] client_timeout``,
    :class:`_StallLimited`).
    """

    def init_process(self) -> None:
        # gunicorn's Worker.handle_error writes through util.write_error; this is the worker process
        # regmw's own server forked, so replacing it here changes no other server.
        gunicorn_util.write_error = write_oci_error
        self.stall_limit = stall_limit(self.app.section["client_timeout"])
        self.log.error_log.addFilter(_stalled_head_in_one_line)
        super().init_process()

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        _written.status = None
        super().handle_error(req, client, addr, exc)
        status = _written.status
        # A chunked body's error is met while the app reads it: the middleware has seen (and logged) that request.
        if status is None or not isinstance(exc, ParseException) or isinstance(exc, _MET_BY_THE_APP):
            return
        from . import metrics  # imported by the app already: prometheus-client's mode is chosen (see run)

        metrics.refusals.labels("invalid").inc()
        if self.app.section["access_log"] and accesslog.access_log.isEnabledFor(logging.INFO):
            environ = {"REQUEST_METHOD": getattr(req, "method", None), "PATH_INFO": getattr(req, "path", None),
                       "REMOTE_ADDR": addr[0] if addr else None}
            accesslog.access_log.info(accesslog.line(environ, status, 0.0, refusal="invalid"))

    def init_signals(self) -> None:
        super().init_signals()
        # Forked with these signals blocked (Arbiter.spawn_worker): one sent to us meanwhile was
        # held pending, and reaches our own handlers now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)

    def accept(self, listener: Any) -> None:
        try:
            super().accept(_StallLimited(listener, self.stall_limit))
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # The master is stopping (Arbiter.stop): our SIGTERM is on its way; stop polling the listener.
            self.set_accept_enabled(False)


#: The status :func:`write_oci_error` answered, per worker thread (read back by ``DrainingWorker.handle_error``).
_written = threading.local()
#: gunicorn's parse errors met while the app reads a chunked body, or in the app's own response headers.
_MET_BY_THE_APP = (InvalidChunkSize, ChunkMissingTerminator, InvalidChunkExtension, InvalidResponseHeader,
                   InvalidResponseHeaderName)


def stall_limit(seconds: int) -> bytes:
    """``seconds`` as the ``struct timeval`` that ``SO_RCVTIMEO``/``SO_SNDTIMEO`` take."""
    return struct.pack("ll", seconds, 0)


class _StallLimited:
    """A listening socket whose accepted connections may wait at most a limit per receive and per send.

    gunicorn's threaded worker waits (without a thread) only for a request's
    first byte; after that it reads the head and the body on a blocking socket
    with no timeout, and writes the answer the same way. A client that sent
    ``Content-Length: 100`` and ten bytes, half a header line, or a chunk size
    it never fills, or that stops reading a pull, held a thread forever:
    ``threads`` such clients and the worker served nobody else. The kernel's
    ``SO_RCVTIMEO``/``SO_SNDTIMEO`` (``[serve] client_timeout``) end such a
    wait: the read or write raises ``EAGAIN``, the app answers 400 (a body cut
    short) or gunicorn closes the connection (a head cut short). The socket
    stays blocking to Python (``gettimeout()`` is None), which the gateway's
    zero-copy splice needs, and a transfer that keeps moving is never cut: the
    limit is per wait, a ``sendfile`` of the server's included
    (:class:`_StallLimitedConnection`). Set on each connection as it is accepted (two
    ``setsockopt`` calls per connection, none per request): set on the
    listening socket instead, connections already queued before a worker set
    it, and UNIX-socket ones, would not inherit it.
    """

    __slots__ = ("_listener", "_limit")

    def __init__(self, listener: Any, limit: bytes) -> None:
        self._listener, self._limit = listener, limit

    def accept(self) -> tuple[socket.socket, Any]:
        accepted, address = self._listener.accept()
        client = _StallLimitedConnection(accepted.family, accepted.type, accepted.proto, fileno=accepted.detach())
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._limit)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._limit)
        return client, address

    def __getattr__(self, name: str) -> Any:
        return getattr(self._listener, name)  # getsockname(), ...: gunicorn's accept asks the listener


def _stalled_head_in_one_line(record: logging.LogRecord) -> bool:
    """gunicorn's error log filter: a request head that stalled is one warning line, not a traceback.

    gunicorn logs any socket error while it reads a head as "Socket error
    processing request." with its traceback; the receive timeout's EAGAIN
    (``[serve] client_timeout``) is a client's doing, and a client stalling
    on purpose would fill the log with tracebacks.
    """
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, BlockingIOError) and record.msg == "Socket error processing request.":
        record.msg, record.args, record.exc_info, record.exc_text = _STALLED_HEAD, (), None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


_STALLED_HEAD = "a client sent part of a request head, then nothing for [serve] client_timeout: connection closed"


class _StallLimitedConnection(socket.socket):
    """An accepted connection whose ``sendfile`` also ends when the client reads nothing for the limit.

    gunicorn sends a ``wsgi.file_wrapper`` body (the bundled registry's blob
    pulls) with ``socket.sendfile``. On a socket blocking to Python, that
    waits in ``select`` without a limit whenever ``os.sendfile`` says EAGAIN,
    and here EAGAIN means ``SO_SNDTIMEO`` expired: the client read nothing for
    ``client_timeout``. This loop raises ``TimeoutError`` instead, so gunicorn
    closes the connection (and the body, so ``regmw_finish`` runs).
    """

    __slots__ = ()

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        if count is None:
            return super().sendfile(file, offset, count)  # gunicorn always gives the count
        sent = 0
        try:
            while sent < count:
                try:
                    done = os.sendfile(self.fileno(), file.fileno(), offset + sent, min(count - sent, 1 << 30))
                except BlockingIOError:
                    raise TimeoutError(errno.ETIMEDOUT, "the client read nothing for [serve] client_timeout") from None
                if done == 0:
                    break  # the file is shorter than count: as socket.sendfile, stop there
                sent += done
        finally:
            if sent:
                file.seek(offset + sent)  # where socket.sendfile leaves the file
        return sent


def write_oci_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's ``util.write_error`` with an OCI error body (``UNKNOWN``; the status says what was wrong).

    The status line carries the status's own reason phrase: gunicorn leaves
    its default ``Bad Request`` with a 501 (an unsupported transfer coding).
    """
    _written.status = status_int
    message = mesg[:256] if mesg else (reason.lower() if status_int < 500 else "internal error")
    body = error_body("UNKNOWN", message)
    head = (f"HTTP/1.1 {status_int} {_reason_phrase(status_int, reason)}\r\nConnection: close\r\n"
            f"Content-Type: application/json; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            "Docker-Distribution-API-Version: registry/2.0\r\n\r\n")
    gunicorn_util.write_nonblock(sock, head.encode("latin-1") + body)


def _reason_phrase(status: int, reason: str) -> str:
    """gunicorn's ``reason``, unless it is the default ``Bad Request`` left with another status: that status's own."""
    if reason != "Bad Request" or status == 400:
        return reason
    return status_phrase(status, "Error")


class Arbiter(_GunicornArbiter):
    """gunicorn's arbiter, which stops listening (refuses new connections) before draining.

    On SIGHUP it validates the configuration file again, and builds the app
    once in a forked child (:func:`trial_build`), before replacing any
    worker: a configuration that cannot start is logged as one line and the
    running workers keep serving. (gunicorn alone would start new workers that
    fail to boot, and then stop the whole server.) A valid one is applied,
    ``[serve]`` included (workers, threads, timeouts; not ``metrics_listen``,
    nor the address given on the command line).
    """

    def reload(self) -> None:
        app = self.app
        try:
            snapshot = read_config(app.regmw_config)
            validated = check_config(app.regmw_config, app.app_spec, app.registry_root, snapshot=snapshot)
        except (ConfigError, OSError) as exc:
            self.log.error("regmw: configuration error, not reloaded (the running workers keep serving): %s", exc)
            return
        failure = trial_build(app, snapshot, validated["serve"]["timeout"])
        if failure is not None:
            self.log.error("regmw: configuration error, not reloaded (the running workers keep serving): %s",
                           failure[1].removeprefix("regmw: "))
            return
        app.snapshot = snapshot
        app.section = dict(validated["serve"])
        app.log_level = validated["regmw"]["log_level"]
        app.trusted_proxies = validated["regmw"]["trusted_proxies"]
        super().reload()

    def spawn_worker(self) -> int:
        """Fork a worker with the signals it handles blocked until it has installed its handlers.

        A freshly forked worker still runs the master's handlers, which only queue the signal
        for the master's loop, in the child's copy of the queue: a SIGTERM sent while a worker
        boots (the master stopping right after start, or while it replaces a worker) was lost,
        and that worker served on until ``graceful_timeout`` ran out and it was killed.
        Blocked, the signal stays pending until :meth:`DrainingWorker.init_signals`.
        """
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        try:
            return super().spawn_worker()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # the master's own signals, pending ones first

    def stop(self, graceful: bool = True) -> None:
        for listener in self.LISTENERS:
            try:
                listener.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        super().stop(graceful)


class RegmwServer(BaseApplication):
    """A gunicorn application serving :func:`regmw.serve.make_application` in each worker."""

    def __init__(self, *, config: str | None, snapshot: tuple[dict[str, Any], str], bind: str,
                 section: dict[str, Any], log_level: str, app: str | None = None,
                 registry_root: str | None = None, trusted_proxies: Sequence[Any] = ()) -> None:
        self.regmw_config = config
        # The file as validated at start or at the last reload: a worker booting later (one replaced
        # after a crash) builds from this, not from a file edited since and not yet reloaded.
        self.snapshot = snapshot
        self.bind = bind
        self.section = section
        self.log_level = log_level
        self.app_spec = app
        self.registry_root = registry_root
        self.trusted_proxies = trusted_proxies
        super().__init__()

    def load_config(self) -> None:
        section = self.section
        settings = {
            "bind": [self.bind],
            "worker_class": "regmw.server.DrainingWorker",
            "workers": section["workers"],
            "threads": section["threads"],
            "worker_connections": section["worker_connections"],
            "timeout": section["timeout"],
            "graceful_timeout": section["graceful_timeout"],
            "keepalive": section["keepalive"],
            # Whose X-Forwarded-Proto (-Ssl, -Protocol) sets wsgi.url_scheme, and SCRIPT_NAME/PATH_INFO
            # headers the environ: regmw's trusted proxies, not gunicorn's own default (any loopback client).
            "forwarded_allow_ips": ",".join(str(network) for network in self.trusted_proxies),
            "accesslog": None,  # regmw writes its own JSON access log (regmw.access)
            "errorlog": "-",
            "loglevel": self.log_level.lower(),
            "proc_name": "regmw",
            "control_socket_disable": True,  # one fixed path per user: several servers would fight over it
            "when_ready": self._when_ready,
            "child_exit": _child_exit,
            "on_exit": _on_exit,
        }
        for key, value in settings.items():
            self.cfg.set(key, value)
        # (tested with gunicorn 27, whose gthread worker drains in-flight requests on SIGTERM: setup.cfg pins it)

    def load(self) -> Any:
        """Runs in each worker, after fork."""
        _configure_logging(self.log_level)
        return self.build_app(self.snapshot, serving=True)

    def build_app(self, snapshot: tuple[dict[str, Any], str], serving: bool) -> Any:
        """The worker's WSGI app from ``snapshot`` (:func:`read_config`); raises AppImportError with one line."""
        from .runtime import build
        from .serve import load_app, make_application

        raw, source = snapshot
        try:
            runtime = build(raw, source=source, serving=serving)
            runtime.services.serving_processes = self.section["workers"]
            app = load_app(self.app_spec) if self.app_spec else None
            return make_application(runtime, app=app, registry_root=self.registry_root)
        except ConfigError as exc:
            # What only building the backends finds (a replaced rate limiter dropping [ratelimit] rules,
            # ...): one line, as the master's validation says it (trial_build, before any worker starts;
            # a worker meeting it all the same stops gunicorn: "App failed to load").
            raise AppImportError(f"regmw: configuration error: {exc}") from exc
        except Exception as exc:
            # A provider hook that raised (a plugin's bug, a backend it insisted on reaching): one line,
            # the traceback only with [regmw] log_level = "DEBUG" (gunicorn, or trial_build, prints it there).
            raise AppImportError(f"regmw: start-up failed: {exception_line(exc)}") from exc

    def run(self) -> None:
        try:
            Arbiter(self).run()
        except RuntimeError as exc:
            print(f"regmw: {exc}", file=sys.stderr)
            sys.exit(1)

    def _when_ready(self, arbiter: Any) -> None:
        listen = self.section["metrics_listen"]
        if listen:
            start_metrics_server(listen)
        log.info("regmw serving on http://%s (%d workers x %d threads)", self.bind,
                 self.section["workers"], self.section["threads"])


def trial_build(app: RegmwServer, snapshot: tuple[dict[str, Any], str], timeout: float) -> tuple[int, str] | None:
    """Build the workers' app once in a forked child: None, or ``regmw serve``'s exit status and error line.

    Validation in the master builds no backend, so a configuration whose
    plugins fail only when built (a provider hook raising, a replaced rate
    limiter) or an ``--app`` that does not import passed it. At start-up
    gunicorn then forked workers that failed to boot, and stopped with its own
    lines and exit status 4; on SIGHUP it had stopped the old workers first,
    so the whole server stopped. The child builds without ``serving`` (no
    background delivery starts) and exits; the master waits at most
    ``timeout`` (``[serve] timeout``, what a booting worker gets) and removes
    the metric files the child's pid left in the multiprocess directory (all
    zero: it served nothing).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child (coverage does not follow os._exit)
        code = 0
        try:
            os.close(read_end)
            for handled in _GunicornArbiter.SIGNALS:  # the master's handlers only queue: a SIGTERM must stop us
                signal.signal(handled, signal.SIG_DFL)
            app.build_app(snapshot, serving=False)
        except BaseException as exc:  # noqa: BLE001 - whatever stops a worker's boot
            code = 2 if isinstance(exc.__cause__, ConfigError) else 1
            if app.log_level.upper() == "DEBUG":
                traceback.print_exception(exc.__cause__ or exc)
            line = str(exc) if isinstance(exc, AppImportError) else f"regmw: {exception_line(exc)}"
            os.write(write_end, line.encode())
        os._exit(code)
    os.close(write_end)
    try:
        finished = select.select([read_end], [], [], timeout)[0]  # readable: a line written, or EOF at exit
        if not finished:
            os.kill(pid, signal.SIGKILL)
        message = os.read(read_end, 4096).decode(errors="replace") if finished else ""
    finally:
        os.close(read_end)
        status = os.waitpid(pid, 0)[1]
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        for leftover in glob.glob(os.path.join(glob.escape(directory), f"*_{pid}.db")) if directory else ():
            os.unlink(leftover)
    if not finished:
        return 1, f"regmw: the app was not built within {timeout:g}s ([serve] timeout)"
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        return (code if code in (1, 2) else 1), message or f"regmw: building the app failed (status {code})"
    return None


def start_metrics_server(listen: str) -> tuple[Any, Any]:
    """Serve every worker's metrics on ``HOST:PORT`` from this (the master) process."""
    from prometheus_client import start_http_server

    from .metrics import exposition_registry

    host, port = metrics_address(listen)
    return start_http_server(port, addr=host, registry=exposition_registry())


def metrics_address(listen: str) -> tuple[str, int]:
    """``[serve] metrics_listen`` (``HOST:PORT``, ``[V6]:PORT``) as (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _child_exit(server: Any, worker: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def _on_exit(server: Any) -> None:
    owned = os.environ.get(_OWNED_DIR)
    if owned and owned == os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        shutil.rmtree(owned, ignore_errors=True)


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    access = logging.getLogger("regmw.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.propagate = False
        access.setLevel(logging.INFO)


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def read_config(config: str | None) -> tuple[dict[str, Any], str]:
    """The configuration file's contents and its name (``{}``, ``<defaults>`` without one); raises ConfigError."""
    path = config or os.environ.get("REGMW_CONFIG")
    return (load_toml(path) if path else {}), str(path or "<defaults>")


def check_config(config: str | None, app: str | None = None, registry_root: str | None = None, *,
                 snapshot: tuple[dict[str, Any], str] | None = None) -> Any:
    """Validate the configuration as start-up would, without building backends; raises ConfigError.

    Returns the validated config. In gateway mode the upstream settings are
    checked too (building a Gateway opens no connection). ``snapshot``: the
    file as :func:`read_config` already read it.
    """
    validated = _validated(*(snapshot or read_config(config)))
    if not app and not registry_root:
        from .gateway import create_gateway

        create_gateway(validated)
    return validated


def _validated(raw: dict[str, Any], source: str) -> Any:
    """Validation as start-up does it (the same plugins, sections and checks), building no backend.

    Backends must not be built in the master: threads (database health) and
    sockets (Redis, upstream pools) do not survive into forked workers.
    """
    from .config import env_overrides, merge, validate
    from .plugins import manager_for
    from .runtime import gather_sections

    sections = gather_sections(manager_for(raw, os.environ, source=source))
    return validate(merge(raw, env_overrides(sections, os.environ)), sections, source)


_DIR_PREFIX = "regmw-metrics-"


def _remove_stale_metrics_dirs() -> None:
    """Remove metrics directories of servers that are gone (killed before they could clean up)."""
    base = tempfile.gettempdir()
    for name in os.listdir(base):
        if not name.startswith(_DIR_PREFIX):
            continue
        pid = name[len(_DIR_PREFIX):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


class ListenError(OSError):
    """``regmw serve`` cannot listen on the address it was given (in use, not this host's, unknown name)."""


def check_listen(host: str, port: int, what: str = "") -> None:
    """Bind ``host:port`` once as gunicorn will (``SO_REUSEADDR``), so a port in use fails at once, in one line.

    gunicorn itself retries five times a second apart, then logs "Can't
    connect". Skipped for port 0 and, for the API address, for sockets handed
    over by a parent (systemd's ``LISTEN_FDS``, gunicorn's ``GUNICORN_FD`` on
    re-exec). ``what`` names the setting in the line (``[serve] metrics_listen``).
    """
    if port == 0 or (not what and (os.environ.get("LISTEN_FDS") or os.environ.get("GUNICORN_FD"))):
        return
    where = f"{what + ': ' if what else ''}cannot listen on {_bind(host, port)}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"{where}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ListenError(f"{where}: {exc.strerror or exc}") from None


def run(config: str | None, host: str = "127.0.0.1", port: int = 5000, *, app: str | None = None,
        registry_root: str | None = None) -> int:
    """What ``regmw serve`` calls: validate, then serve on gunicorn until SIGTERM/SIGINT.

    Raises :class:`~regmw.errors.ConfigError` for a bad configuration (before
    any process starts). Does not return while serving: the process re-executes
    itself once to switch prometheus-client to multiprocess mode.
    """
    validated = check_config(config, app, registry_root)
    check_listen(host, port)
    if validated["serve"]["metrics_listen"]:  # the master binds it only once gunicorn listens (when_ready)
        check_listen(*metrics_address(validated["serve"]["metrics_listen"]), what="[serve] metrics_listen")
    argv = [sys.executable, "-m", "regmw.server", "--host", host, "--port", str(port)]
    for flag, value in (("--config", config), ("--app", app), ("--registry-root", registry_root)):
        if value:
            argv += [flag, value]
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _remove_stale_metrics_dirs()
        directory = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")  # exec keeps the PID
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ[_OWNED_DIR] = directory
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, argv)
    return main(argv[3:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="regmw-server", description="regmw on gunicorn (use `regmw serve`)")
    parser.add_argument("--config")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--app")
    parser.add_argument("--registry-root")
    args = parser.parse_args(argv)
    try:
        snapshot = read_config(args.config)
        validated = check_config(args.config, args.app, args.registry_root, snapshot=snapshot)
    except ConfigError as exc:
        print(f"regmw: configuration error: {exc}", file=sys.stderr)
        _on_exit(None)
        return 2
    server = RegmwServer(config=args.config, snapshot=snapshot, bind=_bind(args.host, args.port),
                         section=dict(validated["serve"]), log_level=validated["regmw"]["log_level"], app=args.app,
                         registry_root=args.registry_root, trusted_proxies=validated["regmw"]["trusted_proxies"])
    failure = trial_build(server, snapshot, validated["serve"]["timeout"])  # one line, before any worker starts
    if failure is not None:
        print(failure[1], file=sys.stderr)
        _on_exit(None)
        return failure[0]
    server.run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
