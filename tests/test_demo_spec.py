"""``regmw demo``'s reference registry answers as the OCI distribution spec (1.1) and Debian's
``docker-registry`` (distribution 2.8) do where they agree, over real HTTP.

Each case runs against the demo's middleware on werkzeug's server (as ``regmw demo`` serves it) and
against a real ``docker-registry``: the same requests, the same answers. Where the two disagree the
demo follows the spec, and registry.py says so next to the code; those cases are not here, but for
the referrers API, which distribution 2.8 lacks: its test asks the demo alone.
"""
from __future__ import annotations

import hashlib
import json
from urllib.parse import urlsplit

import pytest

from regmw.demo.registry import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from tests.servers._util import http_request
from tests.test_python_clients import demo_url  # noqa: F401 - a fixture

pytestmark = pytest.mark.services

REPO = "spec/check"
CONFIG = b'{"architecture":"amd64","os":"linux"}'
LAYER = b"layer bytes"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["demo", "docker-registry"])
def registry(request) -> str:
    """The URL of the demo's middleware, or of a fresh ``docker-registry``, with CONFIG, LAYER and the empty blob in REPO."""
    if request.param == "demo":
        url = request.getfixturevalue("demo_url")[0]
    else:
        url = request.getfixturevalue("docker_registry").url
    for blob in (CONFIG, LAYER, b""):
        push_blob(url, blob)
    return url


def push_blob(url: str, data: bytes) -> None:
    """POST then PUT with the digest: the upload both registries take (2.8 ignores a POST's body)."""
    status, headers, _ = http_request(url, "POST", f"/v2/{REPO}/blobs/uploads/")
    assert status == 202, status
    location = urlsplit(headers["Location"])
    query = f"{location.query}&" if location.query else ""
    status, _, body = http_request(url, "PUT", f"{location.path}?{query}digest={_digest(data)}", data,
                                   {"Content-Type": "application/octet-stream"})
    assert status == 201, body


def manifest(media_type: str | None) -> bytes:
    fields = {"schemaVersion": 2, **({"mediaType": media_type} if media_type else {}),
              "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _digest(CONFIG),
                         "size": len(CONFIG)},
              "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": _digest(LAYER),
                          "size": len(LAYER)}]}
    return json.dumps(fields).encode()


@pytest.mark.parametrize("declared, content_type, status", [
    (OCI_MANIFEST, OCI_MANIFEST, 201),
    (OCI_MANIFEST, OCI_MANIFEST + "; charset=utf-8", 201),  # the registry SHOULD ignore parameters
    (None, OCI_MANIFEST, 201),  # an OCI manifest may leave mediaType out
    (OCI_MANIFEST, None, 400),
    (OCI_MANIFEST, DOCKER_MANIFEST, 400),
    (OCI_MANIFEST, OCI_INDEX, 400),
    (OCI_MANIFEST, "application/json", 400),
    (None, DOCKER_MANIFEST, 400),  # a Docker manifest names its type
    (None, None, 400),
], ids=["same", "parameters", "oci-without-mediatype", "no-content-type", "docker-type-oci-body",
        "index-type-manifest-body", "json", "docker-without-mediatype", "neither"])
def test_a_manifest_is_taken_only_as_the_type_its_content_type_and_mediatype_agree_on(
        registry, declared, content_type, status):
    headers = {"Content-Type": content_type} if content_type else {}
    got, _, body = http_request(registry, "PUT", f"/v2/{REPO}/manifests/pushed", manifest(declared), headers)
    assert got == status, body
    if status == 400:
        assert json.loads(body)["errors"][0]["code"] == "MANIFEST_INVALID"
        got, _, _ = http_request(registry, "GET", f"/v2/{REPO}/manifests/pushed", headers={"Accept": OCI_MANIFEST})
        assert got == 404  # nothing was tagged


@pytest.mark.parametrize("content_type, fields, status", [
    (OCI_MANIFEST, {**json.loads(manifest(OCI_MANIFEST)), "manifests": []}, 400),
    (OCI_INDEX, json.loads(manifest(None)), 400),  # a manifest's shape, pushed as an index
    (OCI_INDEX, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [],
                 "config": json.loads(manifest(None))["config"]}, 400),
    (OCI_INDEX, {"schemaVersion": 2, "manifests": []}, 201),  # an index may leave mediaType out too
], ids=["manifest-with-manifests", "manifest-shape-as-index", "index-with-config", "index-without-mediatype"])
def test_a_manifest_with_another_types_fields_is_refused_as_ambiguous(registry, content_type, fields, status):
    """CVE-2021-41190: a body both a manifest and an index would be read by its shape as either."""
    got, _, body = http_request(registry, "PUT", f"/v2/{REPO}/manifests/pushed", json.dumps(fields).encode(),
                                {"Content-Type": content_type})
    assert got == status, body
    if status == 400:
        assert json.loads(body)["errors"][0]["code"] == "MANIFEST_INVALID"


@pytest.mark.parametrize("data", [LAYER, b""], ids=["blob", "empty-blob"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_blob_is_octet_stream_and_cacheable_for_a_year(registry, method, data):
    """Content-addressed, so immutable: distribution's Cache-Control; a zero-length blob keeps its type too."""
    status, headers, body = http_request(registry, method, f"/v2/{REPO}/blobs/{_digest(data)}")
    assert status == 200
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Cache-Control"] == "max-age=31536000"
    assert headers["Content-Length"] == str(len(data)) and headers["Docker-Content-Digest"] == _digest(data)
    assert body == (data if method == "GET" else b"")


def test_the_referrers_api_lists_the_manifests_whose_subject_is_the_digest(demo_url):  # noqa: F811
    """OCI 1.1's referrers API, which distribution 2.8 lacks (its 404 sends a client to the referrers tag)."""
    url = demo_url[0]
    for blob in (CONFIG, LAYER):
        push_blob(url, blob)
    subject = manifest(OCI_MANIFEST)
    status, _, _ = http_request(url, "PUT", f"/v2/{REPO}/manifests/v1", subject, {"Content-Type": OCI_MANIFEST})
    assert status == 201
    descriptor = {"mediaType": OCI_MANIFEST, "digest": _digest(subject), "size": len(subject)}
    signature = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sig",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": _digest(CONFIG), "size": len(CONFIG)},
        "layers": [], "subject": descriptor, "annotations": {"org.example.signed-by": "ci"},
    }).encode()
    sbom = json.dumps({**json.loads(manifest(OCI_MANIFEST)), "subject": descriptor}).encode()  # no artifactType
    pushed = []
    for referrer in (signature, sbom):
        status, headers, body = http_request(url, "PUT", f"/v2/{REPO}/manifests/{_digest(referrer)}", referrer,
                                             {"Content-Type": OCI_MANIFEST})
        assert status == 201, body
        pushed.append(headers["OCI-Subject"])
    assert pushed == [_digest(subject)] * 2  # the registry processed the subject: no referrers tag needed

    status, headers, body = http_request(url, "GET", f"/v2/{REPO}/referrers/{_digest(subject)}")
    assert status == 200 and headers["Content-Type"] == OCI_INDEX and "OCI-Filters-Applied" not in headers
    index = json.loads(body)
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    assert sorted(index["manifests"], key=lambda d: d["digest"]) == sorted([
        {"mediaType": OCI_MANIFEST, "digest": _digest(signature), "size": len(signature),
         "artifactType": "application/vnd.example.sig", "annotations": {"org.example.signed-by": "ci"}},
        {"mediaType": OCI_MANIFEST, "digest": _digest(sbom), "size": len(sbom),
         "artifactType": "application/vnd.oci.image.config.v1+json"},  # an image manifest's config type
    ], key=lambda d: d["digest"])

    status, headers, body = http_request(
        url, "GET", f"/v2/{REPO}/referrers/{_digest(subject)}?artifactType=application/vnd.example.sig")
    assert status == 200 and headers["OCI-Filters-Applied"] == "artifactType"
    assert [d["digest"] for d in json.loads(body)["manifests"]] == [_digest(signature)]

    for unknown in (_digest(b"no such manifest"), _digest(signature)):  # none refer to it: empty, never 404
        status, _, body = http_request(url, "GET", f"/v2/{REPO}/referrers/{unknown}")
        assert status == 200 and json.loads(body)["manifests"] == []


def test_a_repository_is_known_to_tags_list_by_its_tags_and_a_manifest_delete_takes_its_tags(registry):
    """Blobs alone (or an upload) make no repository for tags/list; a manifest deleted by digest takes its tags."""
    tags = f"/v2/{REPO}/tags/list"
    status, _, body = http_request(registry, "GET", tags)
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"
    pushed = manifest(OCI_MANIFEST)
    status, _, _ = http_request(registry, "PUT", f"/v2/{REPO}/manifests/v1", pushed, {"Content-Type": OCI_MANIFEST})
    assert status == 201
    assert json.loads(http_request(registry, "GET", tags)[2])["tags"] == ["v1"]
    by_digest = f"/v2/{REPO}/manifests/{_digest(pushed)}"
    assert http_request(registry, "DELETE", by_digest)[0] == 202
    status, _, body = http_request(registry, "DELETE", by_digest)
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    status, _, _ = http_request(registry, "GET", f"/v2/{REPO}/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert status == 404
    status, _, body = http_request(registry, "GET", tags)
    # the repository is still there, with no tag: distribution 2.8 says "tags": null, the demo the spec's []
    assert status == 200 and not json.loads(body)["tags"]


def test_a_manifest_naming_unknown_blobs_gets_one_error_per_blob(registry):
    unknown = [_digest(b"no config"), _digest(b"no layer")]
    body = json.loads(manifest(OCI_MANIFEST))
    body["config"]["digest"], body["layers"][0]["digest"] = unknown
    status, _, answer = http_request(registry, "PUT", f"/v2/{REPO}/manifests/v1", json.dumps(body).encode(),
                                     {"Content-Type": OCI_MANIFEST})
    errors = json.loads(answer)["errors"]
    assert status == 400 and [e["code"] for e in errors] == ["MANIFEST_BLOB_UNKNOWN"] * 2
    assert all(digest in json.dumps(error["detail"]) for error, digest in zip(errors, unknown, strict=True))


def test_a_cancelled_upload_is_answered_204_with_its_uuid_and_is_gone(registry):
    """DELETE on an upload: 204 naming it in Docker-Upload-UUID (as distribution's CancelBlobUpload); then unknown."""
    def uuid(headers: dict) -> str | None:  # distribution sends it as Go spells it: Docker-Upload-Uuid
        return {name.lower(): value for name, value in headers.items()}.get("docker-upload-uuid")

    status, headers, _ = http_request(registry, "POST", f"/v2/{REPO}/blobs/uploads/")
    assert status == 202 and uuid(headers)
    location = urlsplit(headers["Location"])
    target = f"{location.path}?{location.query}" if location.query else location.path
    status, deleted, _ = http_request(registry, "DELETE", target)
    assert status == 204 and uuid(deleted) == uuid(headers), (status, deleted)
    status, _, body = http_request(registry, "GET", target)
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
