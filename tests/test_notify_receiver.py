"""Notifications as a receiver sees them: `regmw serve --registry-root` with Redis, `regmw notifications worker`,
skopeo and raw HTTP clients, and a real receiver verifying every POST with the `standardwebhooks` package."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from standardwebhooks import Webhook

from .oci_image import MANIFEST_TYPE, write_oci_layout
from .servers._util import free_port, http_request, stop, wait_for_port, wait_until
from .servers.webhook_receiver import SECRET
from .test_registry_e2e import skopeo  # noqa: F401 - the fixture

NEW_SECRET = "whsec_" + "C2FVsBQIhrscChlQIMV+b5sSYspob7oD"


@pytest.fixture
def regmw_stack(tmp_path, redis_server, webhook_receiver):
    """``start(**endpoint) -> (base url, receiver)``: a server and a worker delivering to one receiver."""
    procs = []

    def start(**endpoint):
        receiver = webhook_receiver()
        receiver.record = True
        table = {"name": "hook", "url": receiver.url, "secrets": [NEW_SECRET, SECRET], "timeout": 2,
                 "retry_schedule": [0, 0.2]}
        table.update(endpoint)
        inline = ", ".join(f"{key} = {json.dumps(value)}" for key, value in table.items())  # JSON values are TOML
        config = tmp_path / "regmw.toml"
        config.write_text(
            '[regmw]\nplugins = ["redis", "notifications"]\nentry_points = false\n'
            'trusted_proxies = ["127.0.0.0/8"]\n'
            f'[redis]\nurl = "{redis_server[1]}"\n'
            f'[notifications]\nshards = 4\nlease_ttl = 2\nspool_dir = "{tmp_path / "spool"}"\n'
            f'allowed_networks = ["127.0.0.0/8"]\nendpoints = [{{{inline}}}]\n')
        port = free_port()
        env = {**os.environ, "REGMW_CONFIG": str(config)}
        server = subprocess.Popen([sys.executable, "-m", "regmw.cli", "serve", "--port", str(port),
                                   "--registry-root", str(tmp_path / "data")], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(server)
        procs.append(subprocess.Popen([sys.executable, "-m", "regmw.cli", "notifications", "worker"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for_port(port, proc=server, timeout=20)
        return f"http://127.0.0.1:{port}", receiver

    yield start
    for proc in procs:
        stop(proc)


def events_of(receiver) -> list[dict]:
    """Every event of every POST answered 2xx, each POST verified by a consumer holding only one of the secrets."""
    out = []
    for headers, body, status in list(receiver.raw):
        for secret in (SECRET, NEW_SECRET):  # rotation: either secret alone verifies the exact bytes sent
            assert Webhook(secret).verify(body, headers) == json.loads(body)
        assert headers["Content-Type"] == "application/vnd.docker.distribution.events.v1+json"
        if status == 200:
            out.extend(json.loads(body)["events"])
    return out


def test_push_pull_delete_events_as_a_receiver_sees_them(regmw_stack, skopeo, tmp_path):  # noqa: F811
    base, receiver = regmw_stack()
    image = write_oci_layout(tmp_path / "image", [{"a.txt": b"hello"}], tag="v1")
    skopeo(f"oci:{image.path}:v1", f"docker://{base[len('http://'):]}/team/app:v1")
    wait_until(lambda: len(events_of(receiver)) >= 3, 20, "the push's three events (two blobs, the manifest)")
    pushed = events_of(receiver)
    assert [event["action"] for event in pushed] == ["push"] * 3
    manifest = pushed[-1]["target"]
    assert manifest == {"mediaType": MANIFEST_TYPE, "size": len(image.manifest), "length": len(image.manifest),
                        "digest": image.manifest_digest, "repository": "team/app", "tag": "v1",
                        "url": f"{base}/v2/team/app/manifests/{image.manifest_digest}"}
    assert {event["target"]["digest"] for event in pushed[:2]} == {image.config_digest, *image.layer_digests}
    assert all("tag" not in event["target"] for event in pushed[:2])

    # a pull through a trusted proxy: request.addr is the client behind it, not the proxy
    accept = {"Accept": MANIFEST_TYPE, "User-Agent": "receiver-test/1"}
    status, _, _ = http_request(base, "GET", "/v2/team/app/manifests/v1",
                                headers={**accept, "X-Forwarded-For": "203.0.113.7"})
    assert status == 200
    # a delete of the manifest by digest: no tag, and no media type (the answer to a DELETE is not a manifest)
    status, _, _ = http_request(base, "DELETE", f"/v2/team/app/manifests/{image.manifest_digest}")
    assert status == 202
    wait_until(lambda: len(events_of(receiver)) >= 5, 20, "the pull and the delete")
    pull, delete = events_of(receiver)[3:5]
    assert pull["action"] == "pull" and pull["target"]["tag"] == "v1"
    assert pull["target"]["digest"] == image.manifest_digest and pull["target"]["mediaType"] == MANIFEST_TYPE
    assert pull["request"]["addr"] == "203.0.113.7" and pull["request"]["useragent"] == "receiver-test/1"
    assert delete["action"] == "delete" and delete["request"]["addr"] == "127.0.0.1"
    assert delete["target"] == {"mediaType": "", "size": 0, "length": 0, "digest": image.manifest_digest,
                                "repository": "team/app",
                                "url": f"{base}/v2/team/app/manifests/{image.manifest_digest}"}
    ids = [headers["webhook-id"] for headers, _, _ in receiver.raw]
    assert ids == [event["id"] for event in events_of(receiver)] and len(set(ids)) == 5
