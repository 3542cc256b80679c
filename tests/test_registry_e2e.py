"""End to end with real parts: skopeo pushing and pulling through regmw.

(a) the reference registry wrapped in RegistryMiddleware on a real threaded
server; (b) regmw as a gateway in front of a real ``docker-registry``, with a
PATCH Location ``?_state=`` that must survive the proxy; the old/new dispatch
across two real upstreams; (c) unreachable and silent upstreams.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from werkzeug.test import Client

from regmw import RegistryMiddleware, build, hookimpl
from regmw.defaults.filesystem import FilesystemStorage
from regmw.demo.registry import create_app
from regmw.gateway import Gateway, create_gateway
from tests.oci_image import write_oci_layout
from tests.servers._util import free_port, http_request, need_binary

REPO = "group/project"


class Recorder:
    """A regmw plugin that records what the middleware saw, request by request."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None, str, int | None, str | None]] = []

    @hookimpl
    def regmw_finish(self, context, status):
        self.seen.append((context.method, context.resource, context.repository,
                          context.environ.get("QUERY_STRING", ""), status, context.migration_path))


class ByPrefix:
    """Classify repositories under ``new/`` as new, everything else as old."""

    @hookimpl
    def regmw_classify(self, context):
        return "new" if context.repository.startswith("new/") else "old"


def config(root: Path, **sections) -> dict:
    return {
        "regmw": {"entry_points": False},
        "storage": {"root": str(root)},
        "ratelimit": {"rules": [{"by": "client", "limit": "10000/minute", "name": "per-client"}]},
        **sections,
    }


@pytest.fixture
def skopeo(tmp_path):
    """``skopeo(src, dst)``: a bounded ``skopeo copy`` over plain HTTP with an accept-anything policy."""
    binary = need_binary("skopeo")
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    auth = tmp_path / "auth.json"
    auth.write_text('{"auths": {}}')
    env = {**os.environ, "REGISTRY_AUTH_FILE": str(auth)}

    def copy(src: str, dst: str) -> None:
        cmd = [binary, "--policy", str(policy), "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
               "--retry-times", "0", src, dst]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
        assert result.returncode == 0, f"skopeo copy {src} {dst} failed:\n{result.stderr[-3000:]}"

    return copy


def docker_ref(url: str, name: str = REPO, tag: str = "latest") -> str:
    return f"docker://{urlsplit(url).netloc}/{name}:{tag}"


def assert_same_image(image, pulled_dir: Path) -> None:
    """Every blob of the pushed image came back byte-identical, the manifest included."""
    index = json.loads((pulled_dir / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [image.manifest_digest]
    for digest in [image.manifest_digest, image.config_digest, *image.layer_digests]:
        pulled = pulled_dir / "blobs" / "sha256" / digest.split(":", 1)[1]
        assert pulled.read_bytes() == image.blob(digest), digest


def get(url: str, path: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    return http_request(url, method, path, body, headers)


def repository_files(root: Path, name: str = REPO) -> set[str]:
    """Relative paths of the files a repository holds (uploads in progress excluded)."""
    base = root / "docker" / "registry" / "v2" / "repositories" / name
    return {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file() and "_uploads" not in p.parts}


# --- (a) reference registry behind the middleware ------------------------------


@pytest.mark.services
def test_skopeo_push_pull_through_middleware(tmp_path, skopeo, serve_wsgi):
    root = tmp_path / "storage"
    recorder = Recorder()
    app = RegistryMiddleware(create_app(str(root)), config(root), plugins=[recorder], environ={})
    url = serve_wsgi(app)
    image = write_oci_layout(tmp_path / "image")

    skopeo(f"oci:{image.path}:latest", docker_ref(url))
    skopeo(docker_ref(url), f"oci:{tmp_path / 'pulled'}:latest")

    assert_same_image(image, tmp_path / "pulled")
    calls = {(method, resource) for method, resource, repo, *_ in recorder.seen if repo == REPO}
    assert {("POST", "uploads"), ("PATCH", "uploads"), ("PUT", "uploads"), ("PUT", "manifests"),
            ("GET", "manifests"), ("GET", "blobs")} <= calls
    # The storage stat sees the pushed repository in the same layout, and only it.
    storage = app.services.storage
    assert storage.prefix_exists(f"docker/registry/v2/repositories/{REPO}/")
    assert not storage.prefix_exists("docker/registry/v2/repositories/group/proj/")
    status, headers, body = get(url, f"/v2/{REPO}/tags/list")
    assert status == 200 and json.loads(body) == {"name": REPO, "tags": ["latest"]}
    assert headers["RateLimit-Limit"] == "10000"


# --- (b) gateway in front of a real docker-registry ------------------------------


@pytest.mark.services
def test_skopeo_push_pull_through_gateway(tmp_path, skopeo, serve_wsgi, docker_registry):
    recorder = Recorder()
    runtime = build(config(tmp_path, gateway={"upstream": docker_registry.url, "timeout": 30.0}),
                    environ={}, plugins=[recorder])
    upstream, apps = create_gateway(runtime.config)
    assert apps == {}
    url = serve_wsgi(RegistryMiddleware(upstream, runtime))
    image = write_oci_layout(tmp_path / "image")

    skopeo(f"oci:{image.path}:latest", docker_ref(url))
    skopeo(docker_ref(url), f"oci:{tmp_path / 'pulled'}:latest")

    assert_same_image(image, tmp_path / "pulled")
    # distribution keeps its upload state in the Location's ?_state=; the push
    # working proves it survived, this shows it went through the gateway.
    patches = [query for method, resource, _, query, status, _ in recorder.seen
               if (method, resource) == ("PATCH", "uploads") and status == 202]
    assert patches and all("_state=" in query for query in patches)
    status, headers, body = get(url, f"/v2/{REPO}/tags/list")
    assert status == 200 and json.loads(body)["tags"] == ["latest"]
    assert headers["RateLimit-Limit"] == "10000"
    assert "Docker-Distribution-Api-Version" in headers or "Docker-Distribution-API-Version" in headers
    status, headers, body = get(url, f"/v2/{REPO}/manifests/latest", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert status == 200 and body == image.manifest
    assert headers["Docker-Content-Digest"] == image.manifest_digest
    # The gateway's own upstream pool kept connections alive between requests.
    assert upstream.pool._idle
    upstream.close()

    if docker_registry.root is not None:
        # Same image pushed to the reference registry: the same files at the same paths.
        ref_root = tmp_path / "reference"
        ref_url = serve_wsgi(create_app(str(ref_root)))
        skopeo(f"oci:{image.path}:latest", docker_ref(ref_url))
        files = repository_files(docker_registry.root)
        assert len(files) == 6 and "_manifests/tags/latest/current/link" in files  # 3 layers, revision, 2 tag links
        assert repository_files(ref_root) == files
        assert FilesystemStorage(str(docker_registry.root)).prefix_exists(f"docker/registry/v2/repositories/{REPO}/")


def _push_blob(url: str, name: str, data: bytes) -> tuple[int, dict]:
    """POST an upload, then PUT the whole blob to its Location (distribution 2.8 ignores ?digest= on POST)."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    status, headers, _ = get(url, f"/v2/{name}/blobs/uploads/", "POST", b"")
    assert status == 202, status
    location = urlsplit(headers["Location"])
    assert not location.netloc or location.netloc == urlsplit(url).netloc  # points back at the gateway
    sep = "&" if location.query else ""
    target = f"{location.path}?{location.query}{sep}digest={digest}"
    status, headers, _ = get(url, target, "PUT", data, {"Content-Type": "application/octet-stream"})
    return status, headers


@pytest.mark.services
def test_gateway_dispatches_old_and_new_upstreams(tmp_path, serve_wsgi, docker_registry):
    new_root = tmp_path / "new"
    new_url = serve_wsgi(create_app(str(new_root)))
    recorder = Recorder()
    runtime = build(config(tmp_path, gateway={"old_upstream": docker_registry.url, "new_upstream": new_url}),
                    environ={}, plugins=[ByPrefix(), recorder])
    app, apps = create_gateway(runtime.config)
    assert set(apps) == {"old", "new"} and app.app is apps["old"]  # wrapped in MergedCatalog
    url = serve_wsgi(RegistryMiddleware(app, runtime, apps=apps))

    data = os.urandom(200_000)
    assert _push_blob(url, "new/app", data)[0] == 201
    assert _push_blob(url, "old/app", data)[0] == 201

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    layer = Path("_layers", "sha256", digest.split(":")[1], "link")
    assert (new_root / "docker/registry/v2/repositories/new/app" / layer).is_file()
    assert not (new_root / "docker/registry/v2/repositories/old/app").exists()
    if docker_registry.root is not None:
        assert (docker_registry.root / "docker/registry/v2/repositories/old/app" / layer).is_file()
        assert not (docker_registry.root / "docker/registry/v2/repositories/new/app").exists()
    # Each repository reads back from where it was written.
    for name in ("new/app", "old/app"):
        status, _headers, body = get(url, f"/v2/{name}/blobs/{digest}")
        assert status == 200 and body == data
    assert {path for _, _, repo, _, _, path in recorder.seen if repo == "new/app"} == {"new"}
    assert {path for _, _, repo, _, _, path in recorder.seen if repo == "old/app"} == {"old"}


# --- (c) unreachable or silent upstreams ------------------------------------------


def _oci_error(response) -> dict:
    assert response.headers["Content-Type"].startswith("application/json")
    return json.loads(response.get_data())["errors"][0]


def test_gateway_unreachable_upstream_is_502(tmp_path):
    gateway = Gateway(f"http://127.0.0.1:{free_port()}", timeout=5)
    client = Client(RegistryMiddleware(gateway, config(tmp_path), environ={}))
    for method in ("GET", "HEAD", "PUT"):
        response = client.open(f"/v2/{REPO}/manifests/latest", method=method, data=b"{}" if method == "PUT" else None)
        assert response.status_code == 502
        if method != "HEAD":
            error = _oci_error(response)
            assert error["code"] == "UNAVAILABLE" and "Traceback" not in response.get_data(as_text=True)
    response = client.get(f"/v2/{REPO}/tags/list")
    assert response.headers["RateLimit-Limit"] == "10000"  # refused upstream, still admitted and counted


def test_gateway_silent_upstream_is_504(tmp_path):
    with socket.socket() as listener:  # accepts connections (backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        gateway = Gateway(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.3)
        response = Client(RegistryMiddleware(gateway, config(tmp_path), environ={})).get(f"/v2/{REPO}/tags/list")
    assert response.status_code == 504
    assert _oci_error(response)["code"] == "UNAVAILABLE"


# --- podman, a second real client ------------------------------------------------


@pytest.fixture
def podman(tmp_path):
    """``podman(*args)``: podman as root with its own storage (vfs) under ``tmp_path``; returns stdout."""
    binary = need_binary("podman")
    base = Path(tempfile.mkdtemp(prefix="regmw-podman-"))  # podman refuses a runroot path over 50 characters
    auth = tmp_path / "podman-auth.json"
    auth.write_text('{"auths": {}}')
    env = {**os.environ, "REGISTRY_AUTH_FILE": str(auth)}
    prefix = [binary, "--root", str(base / "root"), "--runroot", str(base / "run"), "--storage-driver", "vfs",
              "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--tmpdir", str(base / "tmp")]

    def run(*args: str) -> str:
        result = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120, env=env, check=False)
        assert result.returncode == 0, f"podman {' '.join(args)} failed:\n{result.stderr[-3000:]}"
        return result.stdout

    yield run
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.services
def test_podman_through_middleware_and_gateway(tmp_path, podman, skopeo, serve_wsgi, docker_registry):
    """podman push (two tags, two manifest formats), search (the catalog), pull by tag and by digest,
    then a delete by digest, through the reference registry behind regmw and through the gateway."""
    root = tmp_path / "storage"
    demo = serve_wsgi(RegistryMiddleware(create_app(str(root)), config(root), environ={}))
    runtime = build(config(tmp_path, gateway={"upstream": docker_registry.url}), environ={})
    upstream, _ = create_gateway(runtime.config)
    gateway = serve_wsgi(RegistryMiddleware(upstream, runtime))
    layer = tmp_path / "layer.tar"
    data = os.urandom(300_000)
    with tarfile.open(layer, "w") as tar:
        info = tarfile.TarInfo("random.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    image_id = podman("import", "-q", str(layer), "localhost/podman-test:1").strip()
    tls = "--tls-verify=false"
    for url in (demo, gateway):
        host = urlsplit(url).netloc
        ref = f"{host}/{REPO}"
        podman("push", tls, "--format", "oci", "localhost/podman-test:1", f"docker://{ref}:1")
        digest_file = tmp_path / f"digest-{host}"
        podman("push", tls, "--format", "v2s2", "--digestfile", str(digest_file), "localhost/podman-test:1",
               f"docker://{ref}:2")
        digest = digest_file.read_text().strip()
        found = podman("search", tls, "--format", "{{.Name}}", f"{host}/group").split()
        assert found == [ref], url
        listed = podman("search", tls, "--list-tags", ref).splitlines()[1:]  # NAME TAG, one row a tag
        assert sorted(tuple(row.split()) for row in listed) == [(ref, "1"), (ref, "2")]

        pulled = podman("pull", "-q", tls, f"{ref}:2").strip()
        assert pulled.endswith(image_id.split(":")[-1]) or image_id.endswith(pulled)  # same config, same image
        status, headers, _ = get(url, f"/v2/{REPO}/manifests/2", "HEAD", headers={
            "Accept": "application/vnd.docker.distribution.manifest.v2+json"})
        assert status == 200 and headers["Docker-Content-Digest"] == digest
        podman("rmi", "-f", f"{ref}:1", f"{ref}:2")
        podman("pull", "-q", tls, f"{ref}@{digest}")

        subprocess.run(["skopeo", "delete", tls, f"docker://{ref}@{digest}"], check=True, capture_output=True,
                       timeout=60)
        assert get(url, f"/v2/{REPO}/manifests/{digest}")[0] == 404
        oci = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
        assert get(url, f"/v2/{REPO}/manifests/1", "HEAD", headers=oci)[0] == 200  # OCI: another digest, kept
        assert json.loads(get(url, f"/v2/{REPO}/tags/list")[2])["tags"] == ["1"]
    upstream.close()
