"""End to end with real Python registry clients from PyPI: oras-py and python-dxf.

skopeo and podman (tests/test_registry_e2e.py) are Go, built on one library
(containers/image); these two are independent implementations with their own
habits, each run (a) against ``regmw demo``'s middleware (every embedded
default, the old/new reference registries) on werkzeug's server, as
``regmw demo`` serves it, and (b) through ``regmw serve`` as a gateway in
front of Debian's ``docker-registry``:

* oras-py pushes files as an artifact (monolithic POST + PUT, and chunked
  PATCHes with ``Content-Range`` whose Location carries distribution's
  ``?_state=``), pulls them back, lists tags with ``n``, deletes a tag by the
  digest its HEAD answered;
* python-dxf pushes a blob from a file (Content-Length) and from an iterator
  (``Transfer-Encoding: chunked`` PUT), skips one a HEAD finds, tags manifests,
  pages through tags and the catalog by following ``Link`` headers, mounts a
  blob across repositories, and deletes a manifest by its digest; against the
  demo it also lists repositories on both paths (old root, and new for an
  eligible token) from one catalog.

oras-py also logs in to a ``docker-registry`` with ``auth: token`` through the
gateway (tests/servers/token_server.py), whose ``[auth]`` verifies the same
token. The blobs pulled through the gateway are over 1 MiB, so they take its
zero-copy (``splice``) path. The clients are installed by the ``test`` extra;
without them these tests skip, or fail under ``REGMW_REQUIRE_SERVICES=1``.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from regmw.demo.run import build_demo, demo_token
from tests.servers._util import http_request, need_module, wait_until
from tests.test_gateway_splice import ZERO_COPY, metric
from tests.test_server import gateway_config, regmw_serve  # noqa: F401 - regmw_serve is a fixture

MIB = 1024 * 1024
DEMO_SECRET = "demo-secret-" + "x" * 32


def _host(url: str) -> str:
    return urlsplit(url).netloc


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _logged(served, method: str, count: int, resource: str = "uploads") -> list[dict]:
    """``regmw serve``'s access-log lines for ``method`` on ``resource`` once there are ``count`` (else [])."""
    lines = [line for line in served.log_lines() if line["method"] == method and line["resource"] == resource]
    return lines if len(lines) >= count else []


@pytest.fixture
def demo_url(tmp_path, serve_wsgi):
    """``regmw demo``'s middleware (its own configuration, no webhook receiver) on werkzeug's threaded server."""
    middleware, decisions = build_demo(str(tmp_path / "demo"), DEMO_SECRET)
    return serve_wsgi(middleware), decisions


@pytest.fixture
def oras(tmp_path, monkeypatch):
    """``oras(url)``: an oras-py client for the registry at ``url``; files are pushed from ``tmp_path``.

    oras-py only pushes files below the working directory, and reads ``~/.docker/config.json``:
    both are pointed at ``tmp_path``.
    """
    client_module = need_module("oras.client")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)

    def make(url: str):
        return client_module.OrasClient(hostname=_host(url), insecure=True)

    return make


@pytest.fixture
def dxf():
    """``dxf(url, repository)``: a python-dxf client over plain HTTP."""
    module = need_module("dxf")

    def make(url: str, repository: str):
        return module.DXF(_host(url), repository, insecure=True)

    return make


# --- oras-py ----------------------------------------------------------------------


def oras_round_trip(oras, url: str, tmp_path: Path, size: int) -> dict[str, bytes]:
    """Push two artifacts (one monolithic, one in chunks), pull both back byte for byte, list and delete a tag."""
    client = oras(url)
    ref = f"{_host(url)}/oras/artifact"
    files = {"notes.txt": b"release notes\n", "payload.bin": os.urandom(size), "chunked.bin": os.urandom(size)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    artifacts = {"v1": ["notes.txt", "payload.bin"], "v2": ["chunked.bin"], "v3": ["notes.txt"]}

    pushed = client.push(files=artifacts["v1"], target=f"{ref}:v1")
    assert pushed.status_code == 201
    manifest_digest = pushed.headers["Docker-Content-Digest"]
    # chunked: POST, then PATCHes with Content-Range, each to the Location the last one answered, then PUT
    chunked = client.push(files=artifacts["v2"], target=f"{ref}:v2", do_chunked=True, chunk_size=size // 3 + 1)
    assert chunked.status_code == 201
    assert client.push(files=artifacts["v3"], target=f"{ref}:v3").status_code == 201

    for tag in ("v1", "v2"):
        out = tmp_path / f"pulled-{tag}"
        pulled = client.pull(target=f"{ref}:{tag}", outdir=str(out))
        assert sorted(Path(p).name for p in pulled) == sorted(artifacts[tag])
        for name in artifacts[tag]:
            assert (out / name).read_bytes() == files[name], (tag, name)
    manifest = client.get_manifest(f"{ref}@{manifest_digest}")
    assert [layer["annotations"]["org.opencontainers.image.title"] for layer in manifest["layers"]] == artifacts["v1"]

    assert sorted(client.get_tags(ref)) == ["v1", "v2", "v3"]
    assert len(client.get_tags(ref, N=2)) == 2
    # HEAD for the digest (Docker-Content-Digest), then DELETE by digest: v3 is a manifest of its own
    assert client.delete_tags(ref, "v3") == ["v3"]
    assert sorted(client.get_tags(ref)) == ["v1", "v2"]
    return files


@pytest.mark.services
def test_oras_push_pull_through_the_demo_middleware(tmp_path, oras, demo_url):
    url, decisions = demo_url
    oras_round_trip(oras, url, tmp_path, size=300_000)
    repo_lines = [line for line in decisions.lines if " oras/artifact " in line]
    assert any(line.startswith("PATCH") and "status=202" in line for line in repo_lines)
    assert all("path=old" in line for line in repo_lines)  # no token: classified old, stored in the old root
    assert (tmp_path / "demo/old/docker/registry/v2/repositories/oras/artifact/_manifests").is_dir()


def test_a_blob_pulled_from_the_demo_has_one_date_header(tmp_path, demo_url):
    """requests joins repeated fields: two Date lines became "Sat, ... GMT, Sat, ... GMT", which no date parser takes."""
    url, _ = demo_url
    data = b"one blob"
    status, headers, _ = http_request(url, "POST", f"/v2/dated/app/blobs/uploads/?digest={_digest(data)}", data,
                                      {"Content-Type": "application/octet-stream"})
    assert status == 201, status
    parts = urlsplit(url)
    for method in ("GET", "HEAD"):
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            conn.request(method, f"/v2/dated/app/blobs/{_digest(data)}")
            response = conn.getresponse()
            response.read()
        finally:
            conn.close()
        assert response.status == 200
        assert len(response.msg.get_all("Date")) == 1, (method, response.msg.get_all("Date"))


@pytest.mark.services
def test_oras_push_pull_through_the_gateway(tmp_path, oras, docker_registry, regmw_serve):  # noqa: F811
    served = regmw_serve(gateway_config(docker_registry.url), metrics=True)
    files = oras_round_trip(oras, served.url, tmp_path, size=int(1.5 * MIB))
    assert metric(served, ZERO_COPY) > 2 * MIB  # the two 1.5 MiB pulls went socket to socket (splice)
    # the upstream holds what went through the gateway
    status, _, body = http_request(docker_registry.url, "GET", "/v2/oras/artifact/tags/list")
    assert status == 200 and sorted(json.loads(body)["tags"]) == ["v1", "v2"]
    status, _, body = http_request(docker_registry.url, "GET", f"/v2/oras/artifact/blobs/{_digest(files['payload.bin'])}")
    assert status == 200 and body == files["payload.bin"]
    # an access-log line is written once its response is finished, after the client has the answer
    patches = wait_until(lambda: _logged(served, "PATCH", 3), what="three PATCH access-log lines")
    assert [line["status"] for line in patches] == [202, 202, 202]


@pytest.mark.services
def test_oras_with_token_auth_through_the_gateway(tmp_path, oras, make_docker_registry, token_server,
                                                  regmw_serve):  # noqa: F811
    """The upstream's Bearer challenge reaches the client unchanged, the client's token reaches the upstream,
    and regmw verifies that same token (its subject's rate-limit rule counts the requests)."""
    upstream = make_docker_registry(token_server.registry_config())
    per_user = '[[ratelimit.rules]]\nby = "subject"\nlimit = "1000/minute"\nname = "per-user"\n'
    served = regmw_serve(gateway_config(upstream.url) + token_server.regmw_config() + per_user)

    status, headers, _ = http_request(served.url, "POST", "/v2/secure/app/blobs/uploads/")
    headers = {name.lower(): value for name, value in headers.items()}
    assert status == 401
    challenge = dict(re.findall(r'(\w+)="([^"]*)"', headers["www-authenticate"]))
    assert headers["www-authenticate"].startswith("Bearer ")
    assert challenge["realm"] == f"{token_server.url}/token" and challenge["service"] == token_server.service
    scope, actions = challenge["scope"].rsplit(":", 1)
    assert scope == "repository:secure/app" and sorted(actions.split(",")) == ["pull", "push"]  # in Go's map order
    assert headers["ratelimit-limit"] == "100000"  # no verified token: no subject, the per-client rule

    client = oras(served.url)
    client.auth.set_basic_auth(token_server.username, token_server.password)
    ref = f"{_host(served.url)}/secure/app"
    data = os.urandom(200_000)
    (tmp_path / "secret.bin").write_bytes(data)
    pushed = client.push(files=["secret.bin"], target=f"{ref}:v1")
    assert pushed.status_code == 201
    assert pushed.headers["RateLimit-Limit"] == "1000"  # regmw verified the token: its subject was counted
    pulled = client.pull(target=f"{ref}:v1", outdir=str(tmp_path / "pulled"))
    assert [Path(p).read_bytes() for p in pulled] == [data]
    assert client.get_tags(ref) == ["v1"]
    assert token_server.issued == [["repository:secure/app:pull"]]  # one token, from the realm, not the gateway
    status, _, _ = http_request(upstream.url, "GET", "/v2/secure/app/tags/list")
    assert status == 401  # the upstream itself still wants a token


# --- python-dxf -------------------------------------------------------------------


def dxf_round_trip(dxf, url: str, tmp_path: Path, size: int) -> None:
    """Blobs from a file and from an iterator, tags, paging, a cross-repository mount, a delete by digest."""
    app = dxf(url, "dxf/app")
    big = os.urandom(size)
    (tmp_path / "big.bin").write_bytes(big)
    small = b"small blob, sent chunked"
    big_digest = app.push_blob(str(tmp_path / "big.bin"))
    assert big_digest == _digest(big)
    # an iterator: requests sends it with Transfer-Encoding: chunked, one chunk per item
    assert app.push_blob(data=iter([small[:5], small[5:]]), digest=_digest(small)) == _digest(small)
    assert app.push_blob(str(tmp_path / "big.bin")) == big_digest  # a HEAD finds it: not uploaded again
    assert app.blob_size(big_digest) == size
    assert b"".join(app.pull_blob(big_digest)) == big  # dxf checks the digest of what it read
    assert b"".join(app.pull_blob(_digest(small))) == small

    aliases = {"v1": [big_digest, _digest(small)], "v2": [_digest(small)], "v3": [big_digest], "v4": [big_digest]}
    for alias, digests in aliases.items():
        app.set_alias(alias, *digests)
    for alias, digests in aliases.items():
        assert app.get_alias(alias) == digests, alias
    # two at a time, following each answer's Link rel="next" (a registry that ignores n answers all at once)
    assert sorted(app.list_aliases(batch_size=2)) == sorted(aliases)

    other = dxf(url, "dxf/other")
    assert other.mount_blob("dxf/app", big_digest) == big_digest  # 201 Created, not a new upload
    assert other.blob_size(big_digest) == size
    assert b"".join(other.pull_blob(big_digest)) == big
    other.set_alias("mounted", big_digest)
    # the catalog one repository a page, following Link
    assert [name for name in app.list_repos(batch_size=1) if name.startswith("dxf/")] == ["dxf/app", "dxf/other"]

    # HEAD/GET for the manifest's digest, DELETE by digest: v3 and v4 are the same manifest, both go
    assert app.del_alias("v3") == [big_digest]
    assert sorted(app.list_aliases()) == ["v1", "v2"]
    assert app.get_alias("v1") == aliases["v1"]


@pytest.mark.services
def test_dxf_through_the_demo_middleware(tmp_path, dxf, demo_url):
    url, decisions = demo_url
    dxf_round_trip(dxf, url, tmp_path, size=300_000)
    mounts = [line for line in decisions.lines if line.startswith("POST") and " dxf/other " in line]
    assert mounts and all("status=201" in line for line in mounts)


@pytest.mark.services
def test_dxf_lists_the_demos_repositories_on_both_paths(dxf, demo_url):
    """A repository pushed with an eligible token lives under the new root: the catalog lists it too."""
    url, decisions = demo_url
    names = ["fresh/app", "legacy/app", "legacy/tool", "zebra/app"]
    for name in names:
        client = dxf(url, name)
        if name.startswith(("fresh/", "zebra/")):
            client.token = demo_token(DEMO_SECRET, name, eligible=True)  # sent as Authorization: Bearer
        data = name.encode()
        client.set_alias("v1", client.push_blob(data=iter([data]), digest=_digest(data)))
    paths = {line.split()[1]: line.split()[3] for line in decisions.lines if line.startswith("PUT ")}
    assert paths == {"fresh/app": "path=new", "legacy/app": "path=old", "legacy/tool": "path=old",
                     "zebra/app": "path=new"}
    lister = dxf(url, "legacy/app")
    assert lister.list_repos() == names
    # one a page, each page's Link naming the next: the merge pages across both roots
    assert lister.list_repos(batch_size=1) == names
    assert lister.list_repos(batch_size=3) == names


@pytest.mark.services
def test_dxf_through_the_gateway(tmp_path, dxf, docker_registry, regmw_serve):  # noqa: F811
    served = regmw_serve(gateway_config(docker_registry.url), metrics=True)
    dxf_round_trip(dxf, served.url, tmp_path, size=int(1.5 * MIB))
    assert metric(served, ZERO_COPY) > 2 * MIB  # dxf's three 1.5 MiB pulls, socket to socket (splice)
    status, _, body = http_request(docker_registry.url, "GET", "/v2/dxf/other/tags/list")
    assert status == 200 and json.loads(body)["tags"] == ["mounted"]
    puts = wait_until(lambda: _logged(served, "PUT", 2), what="two upload PUT access-log lines")
    assert [line["status"] for line in puts] == [201, 201]
