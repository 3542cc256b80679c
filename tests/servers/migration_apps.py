"""The registry behind ``regmw serve`` in the migration tests, and a fast seeder for the old root.

``regmw serve --app 'tests.servers.migration_apps:create()'`` serves two
reference registries (``<root>/old`` and ``<root>/new``, root from
``$REGMW_TEST_REGISTRY_ROOT``) and sends each request to the one the
middleware classified it for (``environ["regmw.context"].migration_path``).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass

from regmw.demo.layout import Layout
from regmw.demo.registry import create_app

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def create():
    root = os.environ["REGMW_TEST_REGISTRY_ROOT"]
    apps = {"old": create_app(os.path.join(root, "old")), "new": create_app(os.path.join(root, "new"))}

    def app(environ, start_response):
        context = environ.get("regmw.context")
        return apps[getattr(context, "migration_path", None) or "old"](environ, start_response)

    return app


@dataclass
class Seeded:
    repository: str
    tag: str
    manifest_digest: str
    layer: bytes


def gzip_layer(size: int) -> tuple[bytes, str]:
    """A tar+gzip layer holding ``size`` random bytes, and its diff id (what a real client expects)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("data.bin")
        info.size = size
        tar.addfile(info, io.BytesIO(os.urandom(size)))
    return gzip.compress(raw.getvalue(), mtime=0), "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()


def seed(root: str, repository: str, size: int, tag: str = "v1") -> Seeded:
    """Write one image into ``<root>/old`` exactly as the registry stores a push (blobs, links, tag)."""
    store = Layout(os.path.join(root, "old"))
    layer, diff_id = gzip_layer(size)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}},
                        sort_keys=True).encode()
    layer_digest = store.put_content(layer)
    config_digest = store.put_content(config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                    "size": len(layer)}],
    }, sort_keys=True).encode()
    manifest_digest = store.put_content(manifest)
    for digest in (layer_digest, config_digest):
        store.link_blob(repository, digest)
    hex_ = manifest_digest.split(":", 1)[1]
    store.write_link(store.revision_link(repository, hex_), manifest_digest)
    store.write_link(store.tag_index(repository, tag, hex_), manifest_digest)
    store.write_link(store.tag_current(repository, tag), manifest_digest)
    return Seeded(repository, tag, manifest_digest, layer)
