"""Hostile and unusual request paths, end to end through a real HTTP server.

The raw request target is what the client sent; the WSGI server decodes it into
PATH_INFO, and regmw reads both (RFC 3986: split on ``/`` first, then decode).
Each case states its expected answer, in-process (the reference registry behind
the middleware) and in gateway mode (docker-registry behind ``Gateway``), where
a manifest read with a reference the grammar refuses is forwarded as is.
"""
from __future__ import annotations

import hashlib
import json
from urllib.parse import urlsplit

import pytest

from regmw import RegistryMiddleware, build
from regmw.demo.registry import create_app
from regmw.gateway import create_gateway
from tests.servers._util import http_request as send

REPO = "group/app"


def config(tmp_path, **sections) -> dict:
    return {
        "regmw": {"entry_points": False},
        "storage": {"root": str(tmp_path / "storage")},
        "ratelimit": {"rules": [{"by": "client", "limit": "100000/minute", "name": "per-client"}]},
        **sections,
    }




def code(body: bytes) -> str:
    return json.loads(body)["errors"][0]["code"]


@pytest.fixture
def in_process(tmp_path, serve_wsgi):
    """(URL, storage root) of the reference registry behind the middleware."""
    root = tmp_path / "registry"
    return serve_wsgi(RegistryMiddleware(create_app(str(root)), config(tmp_path), environ={})), root


def push_config_blob(url: str, name: str = REPO) -> tuple[str, int]:
    data = b'{"architecture":"amd64","os":"linux"}'
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    status, _, _ = send(url, "POST", f"/v2/{name}/blobs/uploads/?digest={digest}", data,
                        {"Content-Type": "application/octet-stream"})
    assert status == 201
    return digest, len(data)


def manifest(digest: str, size: int) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest, "size": size},
        "layers": [],
    }).encode()


MANIFEST_TYPE = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}


# --- in-process: the reference registry behind the middleware ------------------------


@pytest.mark.parametrize("tag", ["%C2%AA", "latest%0A", "%0A", "v1%00", ".hidden"])
def test_refused_tag_read_is_unknown_and_write_is_tag_invalid(in_process, tag):
    url, root = in_process
    blob = push_config_blob(url)
    for method in ("GET", "HEAD"):
        status, headers, body = send(url, method, f"/v2/{REPO}/manifests/{tag}")
        assert status == 404 and headers["Content-Type"].startswith("application/json")
        if method == "GET":
            assert code(body) == "MANIFEST_UNKNOWN"
    status, _, body = send(url, "PUT", f"/v2/{REPO}/manifests/{tag}", manifest(*blob), MANIFEST_TYPE)
    assert (status, code(body)) == (400, "TAG_INVALID")
    tags = root / "docker/registry/v2/repositories" / REPO / "_manifests/tags"
    assert not tags.exists() or not any(tags.iterdir())  # nothing was written under a refused tag


def test_percent_encoded_dot_is_a_dot(in_process):
    url, _ = in_process
    blob = push_config_blob(url)
    status, _, _ = send(url, "PUT", f"/v2/{REPO}/manifests/v1%2E0", manifest(*blob), MANIFEST_TYPE)
    assert status == 201
    status, _, body = send(url, "GET", f"/v2/{REPO}/manifests/v1.0", headers={"Accept": "*/*"})
    assert status == 200 and json.loads(body)["config"]["digest"] == blob[0]
    status, _, body = send(url, "GET", f"/v2/{REPO}/tags/list")
    assert json.loads(body)["tags"] == ["v1.0"]
    # and a name component with an encoded dot is the same name
    status, _, body = send(url, "GET", "/v2/group/app%2Eold/tags/list")
    assert (status, code(body)) == (404, "NAME_UNKNOWN")  # valid name, no such repository


@pytest.mark.parametrize("target, status, error", [
    (f"/v2/{REPO}/%2E%2E/x/tags/list", 400, "NAME_INVALID"),  # %2E%2E is a dot segment
    ("/v2/group%2Fapp/tags/list", 400, "NAME_INVALID"),  # an encoded / is refused
    ("/v2/group%5Capp/tags/list", 400, "NAME_INVALID"),  # an encoded \ too
    ("/v2%2Fgroup/app/tags/list", 400, "NAME_INVALID"),  # decodes to an API path: never passed through
    ("/v2%2f_catalog", 400, "NAME_INVALID"),
    ("/v2%5Cgroup/app/tags/list", 400, "NAME_INVALID"),
    (f"/v2/{REPO}/manifests/x%2Fmanifests%2Flatest", 404, "MANIFEST_UNKNOWN"),
    (f"/v2/{REPO}/tags/list%0A", 404, "NAME_UNKNOWN"),  # trailing newline: no such path
])
def test_encoded_separators_and_dot_segments(in_process, target, status, error):
    url, _ = in_process
    got, _, body = send(url, "GET", target)
    assert (got, code(body)) == (status, error)


@pytest.mark.parametrize("upload_id", ["..", "%2E%2E", "..%2F..%2Fblobs", "a..b", "a%00b", "a%0D%0AX-Evil:%201", "a%0A"])
def test_hostile_upload_ids(in_process, upload_id):
    url, root = in_process
    for method in ("PATCH", "PUT", "DELETE"):
        status, _, body = send(url, method, f"/v2/{REPO}/blobs/uploads/{upload_id}?digest=sha256:{'0' * 64}", b"x")
        assert (status, code(body)) == (400, "BLOB_UPLOAD_INVALID"), method
    status, _, body = send(url, "GET", f"/v2/{REPO}/blobs/uploads/{upload_id}")
    assert (status, code(body)) == (404, "BLOB_UPLOAD_UNKNOWN")


def test_valid_upload_id_still_works(in_process):
    url, _ = in_process
    status, headers, _ = send(url, "POST", f"/v2/{REPO}/blobs/uploads/")
    assert status == 202
    location = urlsplit(headers["Location"]).path
    status, _, _ = send(url, "PATCH", location, b"abc", {"Content-Type": "application/octet-stream"})
    assert status == 202
    digest = "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert send(url, "PUT", f"{location}?digest={digest}")[0] == 201


# --- client identity through a trusted proxy ------------------------------------------


def test_forwarded_hops_with_ports_are_separate_clients(tmp_path, serve_wsgi):
    cfg = config(tmp_path, regmw={"entry_points": False, "trusted_proxies": ["127.0.0.0/8"]})
    cfg["ratelimit"] = {"rules": [{"by": "client", "limit": "2/minute", "name": "per-client"}]}
    url = serve_wsgi(RegistryMiddleware(create_app(str(tmp_path / "registry")), cfg, environ={}))

    def tags(headers: dict) -> int:
        return send(url, "GET", f"/v2/{REPO}/tags/list", headers=headers)[0]

    first = {"X-Forwarded-For": "198.51.100.1:40001"}
    assert [tags(first), tags({"X-Forwarded-For": "198.51.100.1:40002"})] == [404, 404]  # one client, two ports
    assert tags(first) == 429
    assert tags({"X-Forwarded-For": "198.51.100.2:40001"}) == 404  # another client behind the same proxy
    assert tags({"X-Forwarded-For": "[2001:db8::1]:443"}) == 404
    assert tags({"Forwarded": 'for="198.51.100.3:80";proto=http'}) == 404
    assert tags({"Forwarded": "for=198.51.100.1"}) == 429  # the same client, named by RFC 7239
    # A client that writes Forwarded itself while our proxy appends to X-Forwarded-For gets the proxy's key.
    spoof = {"X-Forwarded-For": "198.51.100.4", "Forwarded": "for=203.0.113.99"}
    assert [tags(spoof), tags(spoof), tags(spoof)] == [404, 404, 429]


# --- gateway mode: docker-registry upstream ------------------------------------------------


@pytest.fixture
def gateway(tmp_path, serve_wsgi, docker_registry):
    runtime = build(config(tmp_path, gateway={"upstream": docker_registry.url, "timeout": 30.0}), environ={})
    app, apps = create_gateway(runtime.config)
    yield serve_wsgi(RegistryMiddleware(app, runtime, apps=apps))
    app.close()


@pytest.mark.services
def test_gateway_forwards_reads_of_refused_references(gateway):
    for tag in ("%C2%AA", "latest%0A", ".INVALID_MANIFEST_NAME"):
        status, headers, body = send(gateway, "GET", f"/v2/{REPO}/manifests/{tag}")
        # docker-registry's own answer for a path its router does not match
        assert (status, body) == (404, b"404 page not found\n"), tag
        assert send(gateway, "HEAD", f"/v2/{REPO}/manifests/{tag}")[0] == 404


@pytest.mark.services
def test_gateway_refuses_what_it_must_not_forward(gateway):
    # An encoded / would reach the upstream as a real one (another repository): refused here.
    status, _, body = send(gateway, "GET", f"/v2/{REPO}/manifests/x%2Fmanifests%2Flatest")
    assert (status, code(body)) == (404, "MANIFEST_UNKNOWN")
    status, _, body = send(gateway, "GET", "/v2/group%2Fapp/tags/list")
    assert (status, code(body)) == (400, "NAME_INVALID")
    # Writes are checked here, whatever the upstream would say.
    status, _, body = send(gateway, "PUT", f"/v2/{REPO}/manifests/%C2%AA", b"{}", MANIFEST_TYPE)
    assert (status, code(body)) == (400, "TAG_INVALID")
    status, _, body = send(gateway, "PATCH", f"/v2/{REPO}/blobs/uploads/..%2F..%2Fx", b"x")
    assert (status, code(body)) == (400, "BLOB_UPLOAD_INVALID")


@pytest.mark.services
def test_gateway_refuses_an_encoded_separator_after_v2(gateway):
    # "/v2%2Fgroup/app/..." is "/v2/group/app/..." to the upstream: passed through, it started an
    # upload there (202) with no name check, rate limit, read-only lock or classification.
    for method, target in (("POST", f"/v2%2F{REPO}/blobs/uploads/"), ("GET", f"/v2%2F{REPO}/manifests/latest"),
                           ("GET", "/v2%2F_catalog")):
        status, _, body = send(gateway, method, target, b"" if method == "POST" else None)
        assert (status, code(body)) == (400, "NAME_INVALID"), target


@pytest.mark.services
def test_gateway_percent_encoded_dot_reaches_upstream_as_a_dot(gateway):
    status, _, body = send(gateway, "GET", f"/v2/{REPO}/manifests/v1%2E0")
    assert status == 404 and code(body) in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN")  # docker-registry's JSON answer
