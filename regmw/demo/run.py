"""``regmw demo``: a registry front on 127.0.0.1 with every embedded default enabled.

Two reference registries (``old`` and ``new`` storage roots) sit behind one
regmw middleware that classifies each repository (filesystem prefix checks +
verified bearer-token flag), rate-limits in memory, honours read-only locks,
logs every decision, and sends a signed webhook for every manifest push to a
receiver of its own (the ``notifications`` plugin on its embedded SQLite
queue). ``--self-test`` pushes and pulls through it over HTTP
and checks the decisions, then exits (0 when all held).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Any

import jwt
from werkzeug.serving import WSGIRequestHandler, make_server

from regmw import RegistryMiddleware, hookimpl
from regmw.catalog import MergedCatalog
from regmw.config import load_toml, merge

from .client import DemoClient
from .registry import create_app
from .webhooks import WebhookReceiver

MANIFEST = "application/vnd.oci.image.manifest.v1+json"

log = logging.getLogger("regmw.demo")

LAYOUT = "docker/registry/v2"
#: The demo's per-repository write limit: low enough for the self-test to see a 429, high
#: enough that a whole OCI conformance run (about 60 writes to one repository) fits.
WRITES_PER_MINUTE = 120


class DecisionLog:
    """A demo plugin: one log line per request with every decision regmw made."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    @hookimpl
    def regmw_finish(self, context, status):
        remaining = dict(context.response_headers).get("RateLimit-Remaining", "-")
        line = (f"{context.method:6} {context.repository or '/':16} {context.resource:9} "
                f"path={context.migration_path or '-':3}  status={status}  ratelimit-remaining={remaining}")
        self.lines.append(line)
        log.info(line)


class _QuietHandler(WSGIRequestHandler):
    """The decision log already has a line per request; skip werkzeug's access log.

    What the HTTP server refuses before the app sees a request (a bad request
    line or version, a line or header past its limits) gets an OCI error body,
    not http.server's HTML page. Made by :func:`_handler`, a connection waits
    at most ``[serve] client_timeout`` seconds for the client (``socketserver``'s
    per-connection socket ``timeout``): a client that stalls mid-request, stops reading, or keeps an
    idle connection open is let go (a stalled body is the registry's 400),
    as under ``regmw serve``.
    """

    error_content_type = "application/json; charset=utf-8"
    error_message_format = '{"errors":[{"code":"UNKNOWN","message":"%(message)s"}]}'

    def log_request(self, code="-", size="-") -> None:
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # the message may quote client bytes: JSON-escaped (ASCII) before it goes into the body
        message = self.responses.get(code, ("error",))[0] if message is None else message
        super().send_error(code, json.dumps(message)[1:-1], explain)


def _handler(client_timeout: int) -> type[_QuietHandler]:
    """The demo's request handler with ``[serve] client_timeout`` (the demo's ``-c FILE`` may set it)."""
    return type("_DemoHandler", (_QuietHandler,), {"timeout": client_timeout})


def demo_config(root: str, secret: str, webhooks: WebhookReceiver | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "regmw": {"plugins": ["migration"], "entry_points": False},
        "storage": {"root": root},
        "migration": {"old_root": f"old/{LAYOUT}", "new_root": f"new/{LAYOUT}"},
        # background jobs from a persistent SQLite queue, run inside this process (no Redis, no `regmw worker`)
        "jobs": {"queue_path": os.path.join(root, "jobs.sqlite3"), "run_in_process": True, "min_backoff": 0.2},
        "migration_job": {"drain": 0.1},
        "auth": {"key": secret, "algorithms": ["HS256"], "issuer": "regmw-demo", "audience": "regmw-demo"},
        "ratelimit": {"rules": [
            {"name": "per-client", "by": "client", "limit": "100/second"},
            {"name": "writes-per-repository", "by": "repository", "methods": "write", "limit": f"{WRITES_PER_MINUTE}/minute"},
        ]},
    }
    if webhooks is not None:  # webhook events through the embedded queue (no Redis), delivered in-process
        config["regmw"]["plugins"].append("notifications")
        config["notifications"] = {
            "endpoints": [{"name": "demo", "url": webhooks.url, "secrets": [webhooks.secret], "actions": ["push", "migrated"],
                           "media_types": [MANIFEST, ""]}],
            "allowed_networks": ["127.0.0.0/8"], "spool_dir": os.path.join(root, "notifications"),
        }
    return config


def build_demo(root: str, secret: str, webhooks: WebhookReceiver | None = None,
               overrides: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[RegistryMiddleware, DecisionLog]:
    """The demo's middleware; ``overrides`` (``regmw -c FILE demo``) is laid over its own configuration."""
    decisions = DecisionLog()
    apps = {"old": create_app(os.path.join(root, "old")), "new": create_app(os.path.join(root, "new"))}
    config = merge(demo_config(root, secret, webhooks), overrides or {})
    # A repository lives under one root or the other, and /v2/_catalog is about none: answered by the old
    # registry alone, it left out every new repository (dxf's list_repos, podman search). Both, merged and
    # paged as one registry, as the gateway does with two upstreams.
    app = MergedCatalog(apps["old"], [apps["old"], apps["new"]])
    middleware = RegistryMiddleware(app, config, apps=apps, plugins=[decisions], environ={})
    return middleware, decisions


def demo_token(secret: str, repository: str, eligible: bool) -> str:
    """A registry bearer token granting push/pull on ``repository`` with its migration flag."""
    claims = {
        "iss": "regmw-demo", "aud": "regmw-demo", "sub": "demo-user", "exp": int(time.time()) + 600,
        "access": [{"type": "repository", "name": repository, "actions": ["pull", "push"], "migration_eligible": eligible}],
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def demo(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = args.root or tempfile.mkdtemp(prefix="regmw-demo-")
    secret = secrets.token_urlsafe(32)
    overrides = load_toml(args.config) if args.config else None  # read first: a bad file is one line, nothing started
    webhooks = WebhookReceiver().start()
    middleware, decisions = build_demo(root, secret, webhooks, overrides)
    server = make_server("127.0.0.1", args.port, middleware, threaded=True,
                         request_handler=_handler(middleware.runtime.config["serve"]["client_timeout"]))
    port = server.server_port
    log.info("regmw demo: registry front on http://127.0.0.1:%d (storage %s)", port, root)
    log.info("old repositories live under %s/old, new ones under %s/new", root, root)
    if not args.self_test:
        log.info("push with: skopeo copy --dest-tls-verify=false oci:DIR docker://127.0.0.1:%d/group/project:latest", port)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        return 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        failures = self_test(port, secret, middleware, webhooks)
    finally:
        server.shutdown()
    print()
    for failure in failures:
        print(f"FAILED: {failure}")
    print(f"self-test: {len(CHECKS) - len(failures)} of {len(CHECKS)} checks held; "
          f"{len(decisions.lines)} requests went through regmw")
    return 1 if failures else 0


CHECKS = (
    "push to a repository with no token lands on the old path",
    "pull it back byte-identical",
    "a verified token with migration_eligible=true sends a new repository to the new path",
    "an existing old repository stays old even with an eligible token",
    "a forged token is ignored (repository stays old)",
    "a read-only repository refuses writes with 503 and serves reads",
    "an invalid repository name gets 400 NAME_INVALID",
    "the migration job moved legacy/app to the new root (lock, copy, verify, mark new) and announced it",
    "the write rate limit answers 429 with Retry-After",
    "every accepted manifest push arrived as a signed webhook event, in order",
)


def self_test(port: int, secret: str, middleware: RegistryMiddleware, webhooks: WebhookReceiver) -> list[str]:
    failures: list[str] = []

    def check(index: int, ok: bool) -> None:
        log.info("%s %s", "ok  " if ok else "FAIL", CHECKS[index])
        if not ok:
            failures.append(CHECKS[index])

    layer = os.urandom(64 * 1024)
    anonymous = DemoClient("127.0.0.1", port)
    answers = anonymous.push_image("legacy/app", "v1", layer)
    check(0, all(a.status == 201 for a in answers) and answers[-1].headers.get("regmw-migration-path") == "old")
    check(1, anonymous.pull_layer("legacy/app", "v1") == layer)

    eligible = DemoClient("127.0.0.1", port, demo_token(secret, "fresh/app", True))
    answers = eligible.push_image("fresh/app", "v1", layer)
    check(2, all(a.status == 201 for a in answers) and answers[-1].headers.get("regmw-migration-path") == "new"
          and eligible.pull_layer("fresh/app", "v1") == layer)

    old_but_eligible = DemoClient("127.0.0.1", port, demo_token(secret, "legacy/app", True))
    check(3, old_but_eligible.request("GET", "/v2/legacy/app/tags/list").headers.get("regmw-migration-path") == "old")

    forged = DemoClient("127.0.0.1", port, demo_token("a-forger-does-not-know-the-demo-secret", "forged/app", True))
    answers = forged.push_image("forged/app", "v1", layer)
    check(4, answers[-1].status == 201 and answers[-1].headers.get("regmw-migration-path") == "old")

    middleware.services.locks.set_read_only("legacy/app", ttl=60, owner="demo")
    write = anonymous.push_image("legacy/app", "v2", layer)[0]
    read = anonymous.request("GET", "/v2/legacy/app/manifests/v1", headers={"Accept": "*/*"})
    check(5, write.status == 503 and write.error_code == "UNAVAILABLE" and "retry-after" in write.headers
          and read.status == 200)
    middleware.services.locks.clear_read_only("legacy/app")

    bad = anonymous.request("GET", "/v2/Bad..Name/tags/list")
    check(6, bad.status == 400 and bad.error_code == "NAME_INVALID")

    # the repository migration workflow, as a job from the persistent local queue run in this process
    jobs = middleware.services.jobs
    job_id = jobs.enqueue("migrate-repository", repository="legacy/app")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(
            r.id == job_id and r.state in ("done", "failed") for r in jobs.status("migrate-repository")):
        time.sleep(0.05)  # the job runs in a background thread: poll until it finished, or give up
    while time.monotonic() < deadline and not any(e["action"] == "migrated" for e in webhooks.received()):
        time.sleep(0.02)
    migrated = [e["target"]["repository"] for e in webhooks.received() if e["action"] == "migrated"]
    check(7, anonymous.request("GET", "/v2/legacy/app/tags/list").headers.get("regmw-migration-path") == "new"
          and anonymous.pull_layer("legacy/app", "v1") == layer and migrated == ["legacy/app"])

    statuses = [anonymous.request("POST", "/v2/busy/app/blobs/uploads/") for _ in range(WRITES_PER_MINUTE + 1)]
    limited = [a for a in statuses if a.status == 429]
    check(8, bool(limited) and limited[0].error_code == "TOOMANYREQUESTS" and limited[0].headers.get("retry-after", "").isdigit())

    expected = [("push", "legacy/app"), ("push", "fresh/app"), ("push", "forged/app")]
    deadline = time.monotonic() + 10
    while len([e for e in webhooks.received() if e["action"] == "push"]) < len(expected) and time.monotonic() < deadline:
        time.sleep(0.02)  # delivery is asynchronous: poll until the events arrived, or give up
    got = [(event["action"], event["target"]["repository"]) for event in webhooks.received()
           if event["action"] == "push"]
    check(9, got == expected)

    return failures
