"""The reference registry's API, in-process (werkzeug's test client): the paths a push does not take."""
from __future__ import annotations

import hashlib
import io
import json

import pytest
from werkzeug.test import Client

from regmw.demo.registry import OCI_MANIFEST, create_app

REPO = "group/project"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def client(tmp_path):
    return Client(create_app(str(tmp_path)))


def error_code(response) -> str:
    return json.loads(response.get_data())["errors"][0]["code"]


def upload(client, name: str, data: bytes) -> str:
    response = client.post(f"/v2/{name}/blobs/uploads/", query_string={"digest": sha(data)}, data=data)
    assert response.status_code == 201, response.get_data()
    assert response.headers["Docker-Content-Digest"] == sha(data)
    return sha(data)


def put_manifest(client, name: str, ref: str, blobs: list[str]):
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blobs[0], "size": 1},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": 1} for d in blobs[1:]],
    }).encode()
    return manifest, client.put(f"/v2/{name}/manifests/{ref}", data=manifest,
                                content_type="application/vnd.oci.image.manifest.v1+json")


def test_base_and_api_version(client):
    response = client.get("/v2/")
    assert response.status_code == 200 and response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_unknown_blob(client):
    digest = sha(b"nothing")
    for method in ("GET", "HEAD"):
        response = client.open(f"/v2/{REPO}/blobs/{digest}", method=method)
        assert response.status_code == 404
    assert error_code(client.get(f"/v2/{REPO}/blobs/{digest}")) == "BLOB_UNKNOWN"
    assert error_code(client.get(f"/v2/{REPO}/blobs/sha256:short")) == "DIGEST_INVALID"


def test_blob_is_per_repository(client):
    digest = upload(client, "a/one", b"layer")
    assert client.get(f"/v2/a/one/blobs/{digest}").get_data() == b"layer"
    assert client.head(f"/v2/a/one/blobs/{digest}").headers["Content-Length"] == "5"
    assert client.get(f"/v2/a/two/blobs/{digest}").status_code == 404  # stored, but not linked there


def test_chunked_upload_and_bad_digest(client):
    data = b"x" * 1000 + b"y" * 1000
    started = client.post(f"/v2/{REPO}/blobs/uploads/")
    assert started.status_code == 202 and started.headers["Range"] == "0-0"
    location, uuid = started.headers["Location"], started.headers["Docker-Upload-UUID"]
    first = client.patch(location, data=data[:1000], headers={"Content-Range": "0-999"})
    assert first.status_code == 202 and first.headers["Range"] == "0-999"
    assert first.headers["Docker-Upload-UUID"] == uuid
    # A chunk that does not continue the upload is refused with the current range.
    gap = client.patch(location, data=data[1000:], headers={"Content-Range": "1500-2499"})
    assert gap.status_code == 416 and gap.headers["Range"] == "0-999"
    assert client.get(location).status_code == 204
    assert client.patch(location, data=data[1000:]).headers["Range"] == "0-1999"
    # PUT without a digest, then with a wrong one: DIGEST_INVALID, nothing stored, upload gone.
    assert error_code(client.put(location)) == "DIGEST_INVALID"
    wrong = client.put(location, query_string={"digest": sha(b"other")})
    assert wrong.status_code == 400 and error_code(wrong) == "DIGEST_INVALID"
    assert client.get(f"/v2/{REPO}/blobs/{sha(b'other')}").status_code == 404
    assert client.get(f"/v2/{REPO}/blobs/{sha(data)}").status_code == 404
    assert error_code(client.get(location)) == "BLOB_UPLOAD_UNKNOWN"


def test_put_completes_upload_with_final_chunk(client):
    location = client.post(f"/v2/{REPO}/blobs/uploads/").headers["Location"]
    client.patch(location, data=b"abc")
    done = client.put(location, query_string={"digest": sha(b"abcdef")}, data=b"def")
    assert done.status_code == 201 and done.headers["Location"] == f"/v2/{REPO}/blobs/{sha(b'abcdef')}"
    assert client.get(done.headers["Location"]).get_data() == b"abcdef"


def test_cross_repository_mount(client):
    digest = upload(client, "src/repo", b"shared layer")
    mounted = client.post(f"/v2/{REPO}/blobs/uploads/", query_string={"mount": digest, "from": "src/repo"})
    assert mounted.status_code == 201 and mounted.headers["Docker-Content-Digest"] == digest
    assert client.get(f"/v2/{REPO}/blobs/{digest}").get_data() == b"shared layer"
    # Not in the source repository: falls back to a normal upload.
    fallback = client.post(f"/v2/{REPO}/blobs/uploads/", query_string={"mount": sha(b"no"), "from": "src/repo"})
    assert fallback.status_code == 202 and fallback.headers["Docker-Upload-UUID"]


def test_manifest_put_get_delete(client):
    blobs = [upload(client, REPO, b"config"), upload(client, REPO, b"layer")]
    manifest, response = put_manifest(client, REPO, "v1", blobs)
    digest = sha(manifest)
    assert response.status_code == 201 and response.headers["Docker-Content-Digest"] == digest
    for ref in ("v1", digest):
        got = client.get(f"/v2/{REPO}/manifests/{ref}")
        assert got.get_data() == manifest
        assert got.headers["Content-Type"] == "application/vnd.oci.image.manifest.v1+json"
        assert got.headers["Docker-Content-Digest"] == digest
        head = client.head(f"/v2/{REPO}/manifests/{ref}")
        assert head.status_code == 200 and head.headers["Content-Length"] == str(len(manifest))
    assert client.put(f"/v2/{REPO}/manifests/v2", data=manifest, content_type=OCI_MANIFEST).status_code == 201
    assert json.loads(client.get(f"/v2/{REPO}/tags/list").get_data()) == {"name": REPO, "tags": ["v1", "v2"]}
    page = client.get(f"/v2/{REPO}/tags/list", query_string={"n": 1})
    assert json.loads(page.get_data())["tags"] == ["v1"] and 'rel="next"' in page.headers["Link"]
    assert page.headers["Link"] == f'</v2/{REPO}/tags/list?n=1&last=v1>; rel="next"'
    after = client.get(f"/v2/{REPO}/tags/list", query_string={"n": 1, "last": "v1"})
    assert json.loads(after.get_data())["tags"] == ["v2"] and "Link" not in after.headers
    empty = client.get(f"/v2/{REPO}/tags/list", query_string={"n": 0})
    assert json.loads(empty.get_data())["tags"] == [] and "Link" not in empty.headers  # no endless paging

    assert client.delete(f"/v2/{REPO}/manifests/v2").status_code == 202  # a tag: only the tag goes
    assert client.get(f"/v2/{REPO}/manifests/{digest}").status_code == 200
    assert client.delete(f"/v2/{REPO}/manifests/{digest}").status_code == 202  # the manifest and its tags
    for ref in ("v1", digest):
        gone = client.get(f"/v2/{REPO}/manifests/{ref}")
        assert gone.status_code == 404 and error_code(gone) == "MANIFEST_UNKNOWN"
    assert client.delete(f"/v2/{REPO}/manifests/{digest}").status_code == 404
    assert json.loads(client.get(f"/v2/{REPO}/tags/list").get_data())["tags"] == []


def test_manifest_errors(client):
    _, missing = put_manifest(client, REPO, "latest", [sha(b"config")])
    assert missing.status_code == 400 and error_code(missing) == "MANIFEST_BLOB_UNKNOWN"
    assert error_code(client.put(f"/v2/{REPO}/manifests/latest", data=b"not json")) == "MANIFEST_INVALID"
    blobs = [upload(client, REPO, b"config")]
    _, wrong = put_manifest(client, REPO, sha(b"something else"), blobs)
    assert error_code(wrong) == "DIGEST_INVALID"
    assert error_code(client.get(f"/v2/{REPO}/manifests/nope")) == "MANIFEST_UNKNOWN"
    assert error_code(client.get("/v2/never/pushed/tags/list")) == "NAME_UNKNOWN"


@pytest.mark.parametrize("path", ["/v2/UPPER/tags/list", "/v2/a/../b/tags/list", "/v2/a//b/tags/list"])
def test_invalid_names(client, path):
    response = client.get(path)
    assert response.status_code in (400, 404)
    assert error_code(response) in ("NAME_INVALID", "NAME_UNKNOWN")


def test_unsupported_method(client):
    response = client.post(f"/v2/{REPO}/manifests/latest")
    assert response.status_code == 405 and error_code(response) == "UNSUPPORTED"
    assert response.headers["Allow"] == "GET, HEAD, PUT, DELETE"  # a 405 names what is allowed (RFC 9110)
    assert client.head(f"/v2/{REPO}/tags/list").headers["Allow"] == "GET"
    location = client.post(f"/v2/{REPO}/blobs/uploads/").headers["Location"]
    assert client.post(location).headers["Allow"] == "GET, PATCH, PUT, DELETE"


@pytest.mark.parametrize("body", [
    b'{"layers": 5}', b'{"layers": [5]}', b'{"layers": {"a": 1}}', b'{"manifests": "x"}', b'{"manifests": [1]}',
    b'{"config": 5}', b'{"a":' * 5000 + b"1" + b"}" * 5000,
], ids=["layers-int", "layer-int", "layers-object", "manifests-str", "manifest-int", "config-int", "nested-5000"])
def test_a_manifest_of_the_wrong_shape_is_manifest_invalid_not_a_500(client, body):
    response = client.put(f"/v2/{REPO}/manifests/latest", data=body,
                          content_type="application/vnd.oci.image.manifest.v1+json")
    assert response.status_code == 400 and error_code(response) == "MANIFEST_INVALID"


def test_a_content_range_with_a_huge_number_is_416_not_a_500(client):
    location = client.post(f"/v2/{REPO}/blobs/uploads/").headers["Location"]
    response = client.patch(location, data=b"hello", headers={"Content-Range": "0-" + "9" * 5000})
    assert response.status_code == 416 and error_code(response) == "BLOB_UPLOAD_INVALID"


class BrokenBody(io.BytesIO):
    """The server's body reader meeting a bad chunk size or EOF mid-chunk: it raises."""

    def read(self, size=-1):
        raise OSError("Invalid chunk header")

    readline = readinto = read


@pytest.mark.parametrize("method, path", [("PUT", f"/v2/{REPO}/manifests/latest"), ("PATCH", "upload"),
                                          ("PUT", "upload?digest=" + sha(b"x"))])
def test_a_body_the_server_cannot_read_is_a_400_with_an_oci_body(client, method, path):
    if path.startswith("upload"):
        path = client.post(f"/v2/{REPO}/blobs/uploads/").headers["Location"] + path[len("upload"):]
    response = client.open(path, method=method, input_stream=BrokenBody(), environ_overrides={"CONTENT_LENGTH": "10"})
    assert response.status_code == 400 and response.mimetype == "application/json"
    assert error_code(response) == "UNKNOWN"


@pytest.mark.parametrize("method, path, status, code", [
    ("PROPFIND", f"/v2/{REPO}/tags/list", 405, "UNSUPPORTED"), ("POST", "/v2/", 405, "UNSUPPORTED"),
    ("DELETE", "/v2", 404, "NAME_UNKNOWN"), ("TRACE", f"/v2/{REPO}/manifests/latest", 405, "UNSUPPORTED"),
])
def test_flasks_own_error_answers_are_oci_bodies_not_html(client, method, path, status, code):
    response = client.open(path, method=method)
    assert response.status_code == status and response.mimetype == "application/json"
    assert error_code(response) == code
    assert ("Allow" in response.headers) == (status == 405)  # Flask's own 405 keeps its Allow header


def test_flasks_own_answer_to_options_is_not_typed_html(client):
    response = client.options(f"/v2/{REPO}/tags/list")
    assert response.status_code == 200 and response.get_data() == b""
    assert "Content-Type" not in response.headers  # an empty answer has no type, not Flask's text/html


CATALOG_NAMES = ["g/seven", "g-eight", "g.nine", "gz", "g/seven/sub", "a/one"]


def test_catalog_lists_repositories_in_distributions_order_with_paging(client):
    """``/v2/_catalog``, which ``podman search`` reads: names in distribution's order ("/" first), paged."""
    assert json.loads(client.get("/v2/_catalog").get_data()) == {"repositories": []}
    for name in CATALOG_NAMES:
        upload(client, name, name.encode())
    client.post("/v2/started/only/blobs/uploads/")  # an upload never finished: no repository yet
    expected = ["a/one", "g/seven", "g/seven/sub", "g-eight", "g.nine", "gz"]
    response = client.get("/v2/_catalog")
    assert response.status_code == 200 and "Link" not in response.headers
    assert json.loads(response.get_data()) == {"repositories": expected}
    seen, query = [], {"n": 2}
    while True:
        page = client.get("/v2/_catalog", query_string=query)
        names = json.loads(page.get_data())["repositories"]
        assert len(names) <= 2
        seen += names
        if "Link" not in page.headers:
            break
        assert page.headers["Link"] == f'</v2/_catalog?last={names[-1].replace("/", "%2F")}&n=2>; rel="next"'
        query = {"n": 2, "last": names[-1]}
    assert seen == expected
    after = client.get("/v2/_catalog", query_string={"last": "g/seven/sub"})
    assert json.loads(after.get_data())["repositories"] == ["g-eight", "g.nine", "gz"]
    assert json.loads(client.get("/v2/_catalog?n=0").get_data())["repositories"] == []
    too_many = client.get("/v2/_catalog?n=1001")
    assert too_many.status_code == 400 and error_code(too_many) == "PAGINATION_NUMBER_INVALID"
