"""The OCI distribution-spec conformance suite (v1.0.1, 59 specs with push, pull,
content discovery and content management enabled) against real registries.

* docker-registry directly, then through ``regmw serve``'s gateway: the gateway
  may not add a single failure (docker-registry 2.8 has four of its own: tag
  ``n``/``last``, out-of-order chunk 416, tag delete);
* ``regmw demo``'s reference registries behind the middleware, with the demo's
  own configuration (classification, rate limits): all 59 pass.

Each run takes about a second once the suite is built (see tests/servers/conformance.py).
"""
from __future__ import annotations

import secrets

import pytest

from regmw import RegistryMiddleware, build
from regmw.demo.run import build_demo
from regmw.gateway import create_gateway

pytestmark = pytest.mark.services

ALL_SPECS = 59


def gateway_config(tmp_path, **gateway) -> dict:
    return {
        "regmw": {"entry_points": False},
        "storage": {"root": str(tmp_path / "storage")},
        "ratelimit": {"rules": [{"by": "client", "limit": "100000/minute", "name": "per-client"}]},
        "gateway": gateway,
    }


def test_gateway_adds_no_failure_to_docker_registry(tmp_path, conformance, make_docker_registry, serve_wsgi):
    direct = conformance(make_docker_registry().url)
    assert direct.ran == ALL_SPECS and direct.passed >= ALL_SPECS - 4, direct

    upstream = make_docker_registry()  # a fresh one: nothing left over from the direct run
    runtime = build(gateway_config(tmp_path, upstream=upstream.url, timeout=30.0), environ={})
    app, apps = create_gateway(runtime.config)
    through_gateway = conformance(serve_wsgi(RegistryMiddleware(app, runtime, apps=apps)))
    app.close()

    assert through_gateway.ran == ALL_SPECS
    assert through_gateway.failed <= direct.failed, f"gateway: {through_gateway}\ndirect: {direct}"


def test_demo_reference_registry_passes_all(tmp_path, conformance, serve_wsgi):
    middleware, decisions = build_demo(str(tmp_path / "demo"), secrets.token_urlsafe(32))
    result = conformance(serve_wsgi(middleware))
    assert (result.ran, result.passed, result.failed) == (ALL_SPECS, ALL_SPECS, set()), result
    # the suite's requests went through the middleware, every kind of them
    resources = {line.split()[2] for line in decisions.lines if line.split()[1] == "conformance/test"}
    assert {"blobs", "uploads", "manifests", "tags"} <= resources
