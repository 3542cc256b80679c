"""Write a tiny OCI image layout with Python, so tests need no Docker engine.

An OCI layout is a folder: ``oci-layout``, ``index.json`` and content-addressed
``blobs/sha256/<hex>`` files (a gzip'd tar layer, a config JSON, a manifest
JSON). ``skopeo copy oci:DIR:TAG docker://...`` pushes it like any image.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass
class OciImage:
    """Where the layout was written and the digests of what it holds."""

    path: Path
    tag: str
    manifest_digest: str
    config_digest: str
    layer_digests: list[str] = field(default_factory=list)

    def blob(self, digest: str) -> bytes:
        return (self.path / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()

    @property
    def manifest(self) -> bytes:
        return self.blob(self.manifest_digest)


def _put(blobs: Path, data: bytes) -> str:
    hex_ = hashlib.sha256(data).hexdigest()
    (blobs / hex_).write_bytes(data)
    return "sha256:" + hex_


def _layer(files: dict[str, bytes]) -> tuple[bytes, str]:
    """A gzip'd tar of ``files`` and its diff id (the digest of the uncompressed tar)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, mtime=0), "sha256:" + hashlib.sha256(tar_bytes).hexdigest()


def write_oci_layout(path: str | os.PathLike, layers: list[dict[str, bytes]] | None = None, tag: str = "latest") -> OciImage:
    """Write an image whose layers hold ``layers`` (one dict of file name -> bytes per layer).

    The default is two layers, one of them ~1 MiB of random bytes (so a push
    needs several 64 KiB chunks through every proxy on the way).
    """
    root = Path(path)
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    if layers is None:
        layers = [{"hello.txt": b"hello from regmw\n"}, {"random.bin": os.urandom(1024 * 1024)}]
    descriptors, diff_ids = [], []
    for files in layers:
        blob, diff_id = _layer(files)
        descriptors.append({"mediaType": LAYER_TYPE, "digest": _put(blobs, blob), "size": len(blob)})
        diff_ids.append(diff_id)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }, sort_keys=True).encode()
    config_digest = _put(blobs, config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": len(config)},
        "layers": descriptors,
    }, sort_keys=True).encode()
    manifest_digest = _put(blobs, manifest)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (root / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MANIFEST_TYPE, "digest": manifest_digest, "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }))
    return OciImage(root, tag, manifest_digest, config_digest, [d["digest"] for d in descriptors])
