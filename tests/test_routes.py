"""OCI path parsing, including hostile paths."""
import pytest

from regmw.errors import Refusal
from regmw.routes import NotAnApiRequest, Route, UnknownReference, parse_path, parse_request

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    "path, route",
    [
        ("/v2/", Route("base")),
        ("/v2", Route("base")),
        ("/v2/_catalog", Route("catalog")),
        ("/v2/alpine/manifests/latest", Route("manifests", "alpine", "latest")),
        (f"/v2/group/sub/project/manifests/{DIGEST}", Route("manifests", "group/sub/project", DIGEST)),
        (f"/v2/a/b/blobs/{DIGEST}", Route("blobs", "a/b", DIGEST)),
        ("/v2/a/b/blobs/uploads/", Route("uploads", "a/b", None)),
        ("/v2/a/b/blobs/uploads", Route("uploads", "a/b", None)),
        ("/v2/a/b/blobs/uploads/0f2a-uuid", Route("uploads", "a/b", "0f2a-uuid")),
        ("/v2/a/b/tags/list", Route("tags", "a/b")),
        (f"/v2/a/referrers/{DIGEST}", Route("referrers", "a", DIGEST)),
        ("/v2/my-app_x.y/a__b/manifests/v1.0", Route("manifests", "my-app_x.y/a__b", "v1.0")),
        # a name that itself contains a resource word is still one name
        ("/v2/foo/blobs/x/manifests/latest", Route("manifests", "foo/blobs/x", "latest")),
    ],
)
def test_valid_paths(path, route):
    assert parse_path(path) == route


@pytest.mark.parametrize("path", ["/", "/healthz", "/v20/x", "/v3/foo/manifests/x", "/static/v2/"])
def test_outside_api_passes_through(path):
    with pytest.raises(NotAnApiRequest):
        parse_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "/v2/../etc/manifests/latest",
        "/v2/foo/../bar/manifests/latest",
        "/v2/./foo/manifests/latest",
        "/v2/Foo/manifests/latest",
        "/v2/foo//bar/manifests/latest",
        "/v2//foo/manifests/latest",
        "/v2/foo/bar/ /manifests/latest",
        "/v2/-foo/manifests/latest",
        "/v2/foo-/manifests/latest",
        "/v2/foo..bar/manifests/latest",
        "/v2/foo___bar/manifests/latest",
        "/v2/foo\\bar/manifests/latest",
        "/v2/{repository:x}/manifests/latest",
        "/v2/" + "a" * 256 + "/manifests/latest",
        "/v2/" + "/".join(["ab"] * 86) + "/tags/list",  # 257 chars
        "/v2/manifests/latest",
    ],
)
def test_invalid_names_are_refused(path):
    with pytest.raises(Refusal) as refusal:
        parse_path(path)
    assert refusal.value.status == 400
    assert refusal.value.code == "NAME_INVALID"


def test_name_at_the_limit_is_accepted():
    name = "/".join(["a" * 50] * 5)[:255].rstrip("/")
    name = name if not name.endswith("/") else name[:-1]
    assert len(name) <= 255
    assert parse_path(f"/v2/{name}/tags/list").repository == name


@pytest.mark.parametrize(
    "method, path, status, code",
    [
        # a manifest read whose reference breaks the grammar answers like a registry: unknown
        ("GET", "/v2/foo/manifests/bad:tag:x", 404, "MANIFEST_UNKNOWN"),
        ("HEAD", "/v2/foo/manifests/.hidden", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/foo/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
        # a write answers 400 with the code for what is wrong
        ("PUT", "/v2/foo/manifests/bad:tag:x", 400, "DIGEST_INVALID"),
        ("PUT", "/v2/foo/manifests/.hidden", 400, "TAG_INVALID"),
        ("DELETE", "/v2/foo/manifests/" + "a" * 129, 400, "TAG_INVALID"),
        ("GET", "/v2/foo/blobs/notadigest", 400, "DIGEST_INVALID"),
        ("GET", "/v2/foo/blobs/sha256:abc", 400, "DIGEST_INVALID"),  # sha256 needs 64 hex digits
        ("GET", "/v2/foo/blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),  # ... lower case
        ("GET", "/v2/foo/blobs/sha512:" + "a" * 64, 400, "DIGEST_INVALID"),  # sha512 needs 128
        ("GET", "/v2/foo/blobs/SHA256:" + "a" * 64, 400, "DIGEST_INVALID"),  # algorithm is lower case
        ("GET", "/v2/foo/unknown/thing", 404, "NAME_UNKNOWN"),
        ("GET", "/v2/foo/tags/list\n", 404, "NAME_UNKNOWN"),
        ("GET", "/v2/foo/manifests/", 404, "NAME_UNKNOWN"),
    ],
)
def test_bad_references(method, path, status, code):
    with pytest.raises(Refusal) as refusal:
        parse_path(path, method)
    assert (refusal.value.status, refusal.value.code) == (status, code)


@pytest.mark.parametrize("digest", [
    "sha256:" + "0" * 64, "sha512:" + "f" * 128, "blake3:" + "a" * 64,
    "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8",  # unregistered: the generic grammar
    "sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564",
])
def test_valid_digests(digest):
    assert parse_path(f"/v2/foo/blobs/{digest}") == Route("blobs", "foo", digest)


@pytest.mark.parametrize("tag", ["latest", "v1.0", "_x", "9", "A-b_c.D", "a" * 128])
def test_valid_tags(tag):
    assert parse_path(f"/v2/foo/manifests/{tag}", "PUT").reference == tag


@pytest.mark.parametrize("tag", [
    "\u00aa",  # ª: a letter to \w, not to the ASCII grammar
    "v1\u0661",  # an Arabic-Indic digit
    "latest\n", "latest\r", "lat\x00est", "-x", ".x", "a" * 129, "a b", "a\\b", "a%2Fb",
])
def test_tags_refused(tag):
    with pytest.raises(Refusal) as read:
        parse_path(f"/v2/foo/manifests/{tag}", "GET")
    assert (read.value.status, read.value.code) == (404, "MANIFEST_UNKNOWN")
    with pytest.raises(Refusal) as write:
        parse_path(f"/v2/foo/manifests/{tag}", "PUT")
    assert (write.value.status, write.value.code) == (400, "TAG_INVALID")


@pytest.mark.parametrize("upload_id", [
    "..", ".", "a..b", "..%2F..", "a\x00b", "a\r\nX-Injected: 1", "a\nb", "a b", "\u00aa", "a;b", "x" * 257,
])
def test_upload_ids_refused(upload_id):
    for method in ("PATCH", "PUT", "DELETE"):
        with pytest.raises(Refusal) as write:
            parse_path(f"/v2/foo/blobs/uploads/{upload_id}", method)
        assert (write.value.status, write.value.code) == (400, "BLOB_UPLOAD_INVALID")
    with pytest.raises(Refusal) as read:
        parse_path(f"/v2/foo/blobs/uploads/{upload_id}", "GET")
    assert (read.value.status, read.value.code) == (404, "BLOB_UPLOAD_UNKNOWN")


@pytest.mark.parametrize("upload_id", [
    "0f2a7c1e-5b7d-4c8e-9a6b-1d2e3f4a5b6c", "abc", "AbC-_.~=+9", "x" * 256,
])
def test_upload_ids_accepted(upload_id):
    assert parse_path(f"/v2/foo/blobs/uploads/{upload_id}", "PATCH") == Route("uploads", "foo", upload_id)


def environ(raw: str, method: str = "GET", script_name: str = "") -> dict:
    """What a WSGI server hands over: the decoded PATH_INFO and the raw target."""
    from urllib.parse import unquote_to_bytes, urlsplit

    path = unquote_to_bytes(urlsplit(raw).path).decode("latin-1")
    return {"REQUEST_METHOD": method, "SCRIPT_NAME": script_name, "PATH_INFO": path[len(script_name):],
            "RAW_URI": raw, "REQUEST_URI": raw}


@pytest.mark.parametrize("raw, route", [
    ("/v2/f%2Eo/tags/list", Route("tags", "f.o")),  # %2E is a dot (RFC 3986), and f.o a valid name
    ("/v2/foo/manifests/v%2E1", Route("manifests", "foo", "v.1")),
    ("/v2/%66oo/manifests/latest?x=%2F", Route("manifests", "foo", "latest")),  # the query is not the path
    ("http://reg.example/v2/foo/tags/list", Route("tags", "foo")),  # absolute-form target
    ("/registry/v2/foo/tags/list", Route("tags", "foo")),  # mounted under SCRIPT_NAME=/registry
])
def test_raw_target_is_decoded_per_segment(raw, route):
    script = "/registry" if raw.startswith("/registry") else ""
    assert parse_request(environ(raw, script_name=script)) == route


@pytest.mark.parametrize("raw, method, status, code", [
    ("/v2/foo/%2E%2E/bar/tags/list", "GET", 400, "NAME_INVALID"),  # %2E%2E is a dot segment
    ("/v2/%2E/foo/tags/list", "GET", 400, "NAME_INVALID"),
    ("/v2/a%2Fb/tags/list", "GET", 400, "NAME_INVALID"),  # an encoded / in the name
    ("/v2/a%2fb/manifests/latest", "PUT", 400, "NAME_INVALID"),
    ("/v2/a%5Cb/tags/list", "GET", 400, "NAME_INVALID"),  # an encoded \
    ("/v2/foo/manifests/x%2Fmanifests%2Flatest", "GET", 404, "MANIFEST_UNKNOWN"),
    ("/v2/foo/manifests/x%2Fmanifests%2Flatest", "PUT", 400, "TAG_INVALID"),
    ("/v2/foo/manifests/%C2%AA", "GET", 404, "MANIFEST_UNKNOWN"),  # Unicode tag
    ("/v2/foo/manifests/%C2%AA", "PUT", 400, "TAG_INVALID"),
    ("/v2/foo/manifests/latest%0A", "HEAD", 404, "MANIFEST_UNKNOWN"),  # trailing newline
    ("/v2/foo/manifests/latest%0A", "PUT", 400, "TAG_INVALID"),
    ("/v2/foo/tags/list%0A", "GET", 404, "NAME_UNKNOWN"),
    ("/v2/foo%0A/tags/list", "GET", 400, "NAME_INVALID"),
    ("/v2/foo/blobs/uploads/%2E%2E", "PATCH", 400, "BLOB_UPLOAD_INVALID"),
    ("/v2/foo/blobs/uploads/..%2F..%2Fx", "PUT", 400, "BLOB_UPLOAD_INVALID"),
    ("/v2/foo/blobs/uploads/a%00b", "PATCH", 400, "BLOB_UPLOAD_INVALID"),
    ("/v2/foo/blobs/uploads/a%0D%0AX-Evil:%201", "DELETE", 400, "BLOB_UPLOAD_INVALID"),
    ("/v2/foo/blobs/uploads/a%0D%0A", "GET", 404, "BLOB_UPLOAD_UNKNOWN"),
])
def test_raw_target_refusals(raw, method, status, code):
    with pytest.raises(Refusal) as refusal:
        parse_request(environ(raw, method))
    assert (refusal.value.status, refusal.value.code) == (status, code)
    assert "\n" not in refusal.value.body().decode() and "\x00" not in refusal.value.body().decode()


def test_unknown_reference_forwardable_only_as_one_plain_segment():
    plain = pytest.raises(UnknownReference, parse_request, environ("/v2/foo/manifests/%C2%AA"))
    assert plain.value.forwardable and plain.value.route == Route("manifests", "foo", None)
    for raw in ("/v2/foo/manifests/x%2Fy", "/v2/foo/manifests/%2E%2E", "/v2/foo/manifests/a%5Cb"):
        assert not pytest.raises(UnknownReference, parse_request, environ(raw)).value.forwardable


def test_without_raw_target_path_info_is_used():
    # A middleware in front rewrote PATH_INFO: the raw target no longer matches it and is ignored.
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/v2/foo/tags/list", "RAW_URI": "/other/v2/a%2Eb/tags/list"}
    assert parse_request(env) == Route("tags", "foo")
    assert parse_request({"PATH_INFO": "/v2/foo/tags/list"}) == Route("tags", "foo")


def test_encoded_separator_refused_when_the_raw_target_cannot_be_matched():
    # werkzeug replaces bytes that are not UTF-8 (%FF) in PATH_INFO: the raw target no longer
    # decodes to it, and the encoded / in it cannot be placed in a segment.
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/v2/a/b/manifests/\xef\xbf\xbd", "RAW_URI": "/v2/a%2Fb/manifests/%FF"}
    with pytest.raises(Refusal) as refusal:
        parse_request(env)
    assert (refusal.value.status, refusal.value.code) == (400, "NAME_INVALID")
