"""A minimal OCI distribution client (standard library only) for ``regmw demo --self-test``.

It pushes a one-layer image (blob upload POST then PUT with ``digest=``,
then the manifest) and pulls it back, the way skopeo does, so the demo shows
every decision regmw makes on a real push without any extra tool installed.
"""
from __future__ import annotations

import hashlib
import http.client
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def error_code(self) -> str | None:
        try:
            return json.loads(self.body)["errors"][0]["code"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class DemoClient:
    def __init__(self, host: str, port: int, token: str | None = None) -> None:
        self.host, self.port, self.token = host, port, token

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Answer:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            headers = dict(headers or {})
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            conn.request(method, path, body=body or None, headers=headers)
            response = conn.getresponse()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            conn.close()

    def push_blob(self, repository: str, data: bytes) -> Answer:
        started = self.request("POST", f"/v2/{repository}/blobs/uploads/")
        if started.status != 202:
            return started
        location = urlsplit(started.headers["location"])
        query = f"{location.query}&" if location.query else ""  # keep upload state the registry put there
        path = f"{location.path}?{query}digest={digest(data)}"
        return self.request("PUT", path, data, {"Content-Type": "application/octet-stream"})

    def push_image(self, repository: str, tag: str, layer: bytes) -> list[Answer]:
        """Push config, layer and manifest; returns every answer (stops at the first failure)."""
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [digest(layer)]}}).encode()
        answers = []
        for blob in (config, layer):
            answers.append(self.push_blob(repository, blob))
            if answers[-1].status != 201:
                return answers
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config), "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(layer), "size": len(layer)}],
        }).encode()
        answers.append(self.request("PUT", f"/v2/{repository}/manifests/{tag}", manifest, {"Content-Type": MANIFEST_TYPE}))
        return answers

    def pull_layer(self, repository: str, tag: str) -> bytes | None:
        manifest = self.request("GET", f"/v2/{repository}/manifests/{tag}", headers={"Accept": MANIFEST_TYPE})
        if manifest.status != 200:
            return None
        layer = json.loads(manifest.body)["layers"][0]["digest"]
        blob = self.request("GET", f"/v2/{repository}/blobs/{layer}")
        return blob.body if blob.status == 200 else None
