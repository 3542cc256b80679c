"""OCI path parsing, including hostile paths."""
import pytest

from regmw.errors import Refusal
from regmw.routes import NotAnApiRequest, Route, parse_path

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
    "path, code",
    [
        ("/v2/foo/manifests/bad:tag:x", "DIGEST_INVALID"),
        ("/v2/foo/blobs/notadigest", "DIGEST_INVALID"),
        ("/v2/foo/manifests/.hidden", "TAG_INVALID"),
        ("/v2/foo/unknown/thing", "NAME_UNKNOWN"),
    ],
)
def test_bad_references(path, code):
    with pytest.raises(Refusal) as refusal:
        parse_path(path)
    assert refusal.value.code == code
