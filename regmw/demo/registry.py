"""A small reference registry: enough of the OCI distribution API for a real client.

Why it exists: ``regmw demo`` and the tests need a registry application to put
the middleware in front of, in-process, without Go or Docker. It is not a
production registry (no auth, no garbage collection, sha256 only), but it
speaks the protocol the way ``registry:2`` does (and OCI distribution 1.1
where the two differ: a comment marks each place, tests/test_demo_spec.py
runs the points they agree on against both), so ``skopeo copy`` pushes to
and pulls from it, and it stores data in distribution's filesystem layout
(:mod:`regmw.demo.layout`) so regmw's filesystem storage stat works on it.

Endpoints (``<name>`` may contain slashes)::

    GET        /v2/
    HEAD, GET  /v2/<name>/blobs/<digest>                    (DELETE too)
    POST       /v2/<name>/blobs/uploads/                    ?digest= (monolithic), ?mount=&from= (mount)
    GET, PATCH, PUT, DELETE  /v2/<name>/blobs/uploads/<uuid>   PUT needs ?digest=
    HEAD, GET, PUT, DELETE   /v2/<name>/manifests/<tag or digest>
    GET        /v2/<name>/tags/list                         ?n=&last=
    GET        /v2/<name>/referrers/<digest>                ?artifactType=
    GET        /v2/_catalog                                 ?n=&last=

The catalog lists what distribution lists (a repository is a folder holding
``_layers``), in its order (``/`` sorts first) and with its paging.

Blob bodies are streamed in both directions (64 KiB at a time); only manifests
(at most 4 MiB) are read whole. Errors are OCI error bodies.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any
from urllib.parse import urlencode

from flask import Flask, Response, request, send_file
from werkzeug.exceptions import BadRequest, ClientDisconnected, HTTPException

from regmw.catalog import MAX_PAGE, catalog_key, page_size
from regmw.errors import error_body, unreadable_body
from regmw.routes import TAG_RE

from .layout import Layout, append_stream, file_digest, parse_digest, valid_name

MAX_MANIFEST = 4 * 1024 * 1024
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
#: The manifest types a push may declare, as distribution 2.8 serves them (schema1 is not taken).
MANIFEST_TYPES = frozenset({OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST})
#: Blobs are content-addressed, so a cache may keep one for a year, as distribution tells it.
BLOB_CACHE_CONTROL = "max-age=31536000"

# One pattern per resource, tried in order (uploads before blobs).
_ROUTES = [
    ("uploads", re.compile(r"(?P<name>.+)/blobs/uploads/(?P<ref>[^/]*)")),
    ("blobs", re.compile(r"(?P<name>.+)/blobs/(?P<ref>[^/]+)")),
    ("manifests", re.compile(r"(?P<name>.+)/manifests/(?P<ref>[^/]+)")),
    ("tags", re.compile(r"(?P<name>.+)/tags/(?P<ref>list)")),
    ("referrers", re.compile(r"(?P<name>.+)/referrers/(?P<ref>[^/]+)")),
]
_STATUS = {
    "BLOB_UNKNOWN": 404, "BLOB_UPLOAD_UNKNOWN": 404, "MANIFEST_UNKNOWN": 404, "NAME_UNKNOWN": 404,
    "DIGEST_INVALID": 400, "MANIFEST_INVALID": 400, "MANIFEST_BLOB_UNKNOWN": 400, "NAME_INVALID": 400,
    "TAG_INVALID": 400, "SIZE_INVALID": 400, "BLOB_UPLOAD_INVALID": 400, "UNSUPPORTED": 405,
}


def oci_error(
    code: str, message: str, detail: Any = None, status: int | None = None, headers: dict[str, str] | None = None,
    each: list[Any] | None = None,
) -> Response:
    """An OCI distribution error response: ``{"errors": [{"code", "message", "detail"}]}`` (one per ``each``)."""
    status = status or _STATUS.get(code, 400)
    return Response(error_body(code, message, detail, each=each), status, mimetype="application/json", headers=headers)


def create_app(root: str) -> Flask:
    """A Flask app serving a registry stored under ``root`` (distribution's filesystem layout)."""
    app = Flask("regmw.demo.registry")
    app.config["REGISTRY_ROOT"] = os.path.abspath(root)
    store = Layout(root)
    handlers = _Handlers(store)

    @app.after_request
    def api_version(response: Response) -> Response:
        response.headers["Docker-Distribution-API-Version"] = "registry/2.0"
        if _empty(response) and response.mimetype == response.default_mimetype:
            response.headers.remove("Content-Type")  # an empty answer nobody typed has no type, not Flask's text/html
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response | HTTPException:
        """Flask's own answers (405, 404 for ``/v2``, 400 for a broken body, 500) as OCI error bodies, not HTML."""
        if exc.code is None or exc.code < 400:
            return exc
        allowed = getattr(exc, "valid_methods", None)  # a 405 names the methods allowed (RFC 9110), as Flask's does
        return oci_error(_HTTP_CODES.get(exc.code, "UNKNOWN"), _HTTP_MESSAGES.get(exc.code) or exc.description or exc.name,
                         status=exc.code, headers={"Allow": ", ".join(sorted(allowed))} if allowed else None)

    @app.route("/v2/", methods=["GET"])
    def base() -> Response:
        return Response("{}", 200, mimetype="application/json")

    @app.route("/v2/<path:rest>", methods=list(_METHODS))
    def api(rest: str) -> Response:
        if rest == "_catalog" and request.method in ("GET", "HEAD"):
            return handlers.catalog_get()
        for resource, pattern in _ROUTES:
            match = pattern.fullmatch(rest)
            if match:
                name, ref = match.group("name"), match.group("ref")
                if not valid_name(name):
                    return oci_error("NAME_INVALID", "invalid repository name", {"name": name[:256]})
                handler = getattr(handlers, f"{resource}_{request.method.lower()}", None)
                if handler is None:
                    allowed = [m for m in _METHODS if hasattr(handlers, f"{resource}_{m.lower()}")]
                    return oci_error("UNSUPPORTED", f"{request.method} is not supported on {resource}",
                                     headers={"Allow": ", ".join(allowed)})
                return handler(name, ref)
        return oci_error("NAME_UNKNOWN", "unknown API path", {"path": rest[:256]}, status=404)

    return app


_METHODS = ("GET", "HEAD", "POST", "PATCH", "PUT", "DELETE")
_HTTP_CODES = {404: "NAME_UNKNOWN", 405: "UNSUPPORTED", 413: "SIZE_INVALID"}
_HTTP_MESSAGES = {404: "unknown API path", 405: "method not supported on this path", 500: "internal error"}


def _empty(response: Response) -> bool:
    """Whether ``response`` has no body: a ``Content-Length: 0``, or no bytes yet to count (Flask's own
    answer to OPTIONS has neither a body nor, until it is sent, a Content-Length). A file is not looked at."""
    if response.headers.get("Content-Length") == "0":
        return True
    return response.is_sequence and not any(response.response)


class _ClientBody:
    """``request.stream``, where a body the server cannot read (a bad chunk size, EOF mid-chunk: its reader
    raises) is the client's 400, not a 500."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        try:
            return self._stream.read(size)
        except ClientDisconnected as exc:  # werkzeug's stream met a read error (or EOF): say which
            raise BadRequest(unreadable_body(exc.__context__ or exc)) from None
        except HTTPException:
            raise
        except Exception as exc:
            raise BadRequest(unreadable_body(exc)) from None


def _body() -> _ClientBody:
    return _ClientBody(request.stream)


class _Handlers:
    """One method per (resource, HTTP method); HEAD goes to the GET handler (Flask drops the body)."""

    def __init__(self, store: Layout) -> None:
        self.store = store

    # --- blobs --------------------------------------------------------------

    def blobs_get(self, name: str, digest: str) -> Response:
        if parse_digest(digest) is None:
            return oci_error("DIGEST_INVALID", "invalid digest", {"digest": digest[:128]})
        path = self.store.linked_blob(name, digest)
        if path is None:
            return oci_error("BLOB_UNKNOWN", "blob unknown to registry", {"digest": digest})
        # send_file streams the file (wsgi.file_wrapper) and honours Range requests.
        response = send_file(path, mimetype="application/octet-stream", conditional=True, etag=digest)
        response.headers["Cache-Control"] = BLOB_CACHE_CONTROL  # send_file's max_age would add "public" and Expires
        response.headers["Docker-Content-Digest"] = digest
        response.headers.remove("Content-Disposition")
        # make_conditional stamps a Date; the HTTP server sends its own (werkzeug's always does, under
        # `regmw demo`), so a pull saw two Date fields, which requests joins into one unparsable value.
        response.headers.remove("Date")
        return response

    blobs_head = blobs_get

    def blobs_delete(self, name: str, digest: str) -> Response:
        if self.store.linked_blob(name, digest) is None:
            return oci_error("BLOB_UNKNOWN", "blob unknown to registry", {"digest": digest[:128]})
        os.unlink(self.store.layer_link(name, parse_digest(digest)))
        return Response(status=202, headers={"Docker-Content-Digest": digest})

    # --- uploads ------------------------------------------------------------

    def uploads_post(self, name: str, ref: str) -> Response:
        if ref:
            return oci_error("UNSUPPORTED", "POST to an existing upload", headers={"Allow": "GET, PATCH, PUT, DELETE"})
        mount, source = request.args.get("mount"), request.args.get("from")
        if mount and source and valid_name(source) and self.store.linked_blob(source, mount):
            self.store.link_blob(name, mount)
            return _blob_created(name, mount)
        # A mount that cannot be served falls back to a new upload, as distribution does.
        upload_id = self.store.start_upload(name)
        digest = request.args.get("digest")
        if digest is not None and not mount:
            return self._finish(name, upload_id, digest)
        return _upload_accepted(name, upload_id, 0)

    def uploads_get(self, name: str, upload_id: str) -> Response:
        data = self.store.upload_data(name, upload_id)
        if data is None:
            return _upload_unknown(upload_id)
        return _upload_accepted(name, upload_id, os.path.getsize(data), status=204)

    def uploads_patch(self, name: str, upload_id: str) -> Response:
        data = self.store.upload_data(name, upload_id)
        if data is None:
            return _upload_unknown(upload_id)
        size = os.path.getsize(data)
        content_range = request.headers.get("Content-Range")
        if content_range:
            match = re.fullmatch(r"(?:bytes[ =])?(\d{1,19})-(\d{1,19})", content_range.strip())
            # OCI 1.1: a chunk out of order is 416 (distribution 2.8 takes it and appends it anyway)
            if match is None or int(match.group(1)) != size:
                return oci_error("BLOB_UPLOAD_INVALID", "content range does not continue the upload",
                                 {"range": content_range[:64]}, 416, _upload_headers(name, upload_id, size))
        size += append_stream(data, _body(), request.content_length)
        return _upload_accepted(name, upload_id, size)

    def uploads_put(self, name: str, upload_id: str) -> Response:
        if self.store.upload_data(name, upload_id) is None:
            return _upload_unknown(upload_id)
        return self._finish(name, upload_id, request.args.get("digest"))

    def uploads_delete(self, name: str, upload_id: str) -> Response:
        if self.store.upload_data(name, upload_id) is None:
            return _upload_unknown(upload_id)
        self.store.end_upload(name, upload_id)
        return Response(status=204, headers={"Docker-Upload-UUID": upload_id})  # as distribution's CancelBlobUpload

    def _finish(self, name: str, upload_id: str, digest: str | None) -> Response:
        """Append the request body, verify the digest, move the data into the blob store."""
        data = self.store.upload_data(name, upload_id)
        if not digest or parse_digest(digest) is None:
            return oci_error("DIGEST_INVALID", "a sha256 digest parameter is required", {"digest": (digest or "")[:128]})
        append_stream(data, _body(), request.content_length)
        actual = file_digest(data)
        if actual != digest:
            self.store.end_upload(name, upload_id)
            return oci_error("DIGEST_INVALID", "provided digest did not match uploaded content",
                             {"expected": digest, "actual": actual})
        self.store.commit(name, data, digest)
        self.store.end_upload(name, upload_id)
        return _blob_created(name, digest)

    # --- manifests ----------------------------------------------------------

    def manifests_get(self, name: str, reference: str) -> Response:
        # Served whatever Accept says: OCI distribution 1.1 answers an existing manifest with 200, while
        # distribution 2.8 answers 404 MANIFEST_UNKNOWN to an Accept (or none) that leaves out an OCI type.
        digest = self._resolve(name, reference)
        if digest is None:
            return oci_error("MANIFEST_UNKNOWN", "manifest unknown", {"name": name, "reference": reference[:128]})
        with open(self.store.blob_data(parse_digest(digest)), "rb") as handle:
            body = handle.read()
        return Response(body, 200, content_type=_media_type(body), headers={"Docker-Content-Digest": digest, "ETag": f'"{digest}"'})

    manifests_head = manifests_get

    def manifests_put(self, name: str, reference: str) -> Response:
        if ":" not in reference and TAG_RE.fullmatch(reference) is None:
            return oci_error("TAG_INVALID", "manifest tag is invalid", {"tag": reference[:128]})
        body = _body().read(MAX_MANIFEST + 1)
        if len(body) > MAX_MANIFEST:
            # OCI distribution 1.1 asks for 413 Payload Too Large; distribution 2.8 answers 400: the spec wins.
            return oci_error("MANIFEST_INVALID", "manifest is larger than 4 MiB", status=413)
        try:
            manifest = json.loads(body)
        except ValueError as exc:
            return oci_error("MANIFEST_INVALID", f"manifest is not JSON: {exc}")
        except RecursionError:
            return oci_error("MANIFEST_INVALID", "manifest is nested too deeply")
        if not isinstance(manifest, dict):
            return oci_error("MANIFEST_INVALID", "manifest is not a JSON object")
        problem = _type_problem(manifest, request.mimetype) or _shape_problem(manifest)
        if problem:
            return oci_error("MANIFEST_INVALID", problem)
        missing = self._missing_references(name, manifest)
        if missing:
            # one error per unknown blob, as distribution 2.8 answers (its detail is the bare digest)
            return oci_error("MANIFEST_BLOB_UNKNOWN", "blob unknown to registry",
                             each=[{"digest": digest} for digest in missing])
        digest = self.store.put_content(body)
        if ":" in reference and reference != digest:
            return oci_error("DIGEST_INVALID", "manifest digest does not match its reference",
                             {"expected": reference[:128], "actual": digest})
        hex_ = parse_digest(digest)
        self.store.write_link(self.store.revision_link(name, hex_), digest)
        if ":" not in reference:
            self.store.write_link(self.store.tag_index(name, reference, hex_), digest)
            self.store.write_link(self.store.tag_current(name, reference), digest)
        headers = {"Location": f"/v2/{name}/manifests/{digest}", "Docker-Content-Digest": digest, "Content-Length": "0"}
        subject = _subject(manifest)
        if subject:  # OCI 1.1: tells the client the referrers API lists it (no referrers tag to maintain)
            headers["OCI-Subject"] = subject
        return Response(status=201, headers=headers)

    def manifests_delete(self, name: str, reference: str) -> Response:
        digest = self._resolve(name, reference)
        if digest is None:
            return oci_error("MANIFEST_UNKNOWN", "manifest unknown", {"name": name, "reference": reference[:128]})
        if ":" in reference:
            # Deleting a manifest removes it and every tag pointing at it.
            os.unlink(self.store.revision_link(name, parse_digest(digest)))
            for tag in self._tags(name):
                if self.store.read_link(self.store.tag_current(name, tag)) == digest:
                    _remove_tree(os.path.join(self.store.tags_dir(name), tag))
        else:  # OCI 1.1 deletes a tag alone; distribution 2.8 refuses it (400 DIGEST_INVALID)
            _remove_tree(os.path.join(self.store.tags_dir(name), reference))
        return Response(status=202)

    def _resolve(self, name: str, reference: str) -> str | None:
        """The digest a tag or digest reference names in ``name``, if the manifest exists."""
        if ":" in reference:
            hex_ = parse_digest(reference)
            if hex_ is None or self.store.read_link(self.store.revision_link(name, hex_)) != reference:
                return None
            return reference
        if TAG_RE.fullmatch(reference) is None:
            return None
        return self.store.read_link(self.store.tag_current(name, reference))

    def _missing_references(self, name: str, manifest: dict) -> list[str]:
        missing = []
        for child in manifest.get("manifests") or ():
            digest = str(child.get("digest", ""))
            if self._resolve(name, digest) is None:
                missing.append(digest)
        blobs = [manifest["config"]] if isinstance(manifest.get("config"), dict) else []
        for layer in [*blobs, *(manifest.get("layers") or ())]:
            digest = str(layer.get("digest", ""))
            if not layer.get("urls") and self.store.linked_blob(name, digest) is None:
                missing.append(digest)
        return missing

    # --- referrers ----------------------------------------------------------

    def referrers_get(self, name: str, digest: str) -> Response:
        """OCI 1.1's referrers API (distribution 2.8 has none): an image index of every manifest in ``name``
        whose ``subject`` is ``digest``, filtered by ``artifactType``; 200, never 404, even for none.

        Found by reading every manifest of the repository, as the demo keeps no index of subjects.
        """
        if parse_digest(digest) is None:
            return oci_error("DIGEST_INVALID", "invalid digest", {"digest": digest[:128]})
        wanted, headers = request.args.get("artifactType"), {}
        referrers = []
        for child in self._revisions(name):
            with open(self.store.blob_data(parse_digest(child)), "rb") as handle:
                body = handle.read()
            manifest = json.loads(body)
            if _subject(manifest) == digest:
                referrers.append(_referrer(manifest, child, len(body), _media_type(body)))
        if wanted is not None:
            referrers = [r for r in referrers if r.get("artifactType") == wanted]
            headers["OCI-Filters-Applied"] = "artifactType"
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": referrers}
        return Response(json.dumps(index), 200, content_type=OCI_INDEX, headers=headers)

    def _revisions(self, name: str) -> list[str]:
        """The digest of every manifest ``name`` holds, sorted."""
        try:
            entries = os.listdir(self.store.revisions_dir(name))
        except (FileNotFoundError, NotADirectoryError):
            return []
        links = (self.store.read_link(self.store.revision_link(name, hex_)) for hex_ in sorted(entries))
        return [digest for digest in links if digest]

    # --- catalog ------------------------------------------------------------

    def catalog_get(self) -> Response:
        """``/v2/_catalog`` as distribution 2.8 answers it: ``n`` (default 100, at most 1000), ``last``, ``Link``."""
        n = page_size(request.args.get("n"))
        if n > MAX_PAGE:
            return oci_error("PAGINATION_NUMBER_INVALID", "invalid number of results requested", {"n": n})
        names = self._repositories()
        last = request.args.get("last")
        if last:
            names = [name for name in names if catalog_key(name) > catalog_key(last)]
        page, headers = names[:n], {}
        if len(names) > n and page:
            headers["Link"] = f'</v2/_catalog?{urlencode({"last": page[-1], "n": n})}>; rel="next"'
        return Response(json.dumps({"repositories": page}), 200, mimetype="application/json", headers=headers)

    def _repositories(self) -> list[str]:
        """Every repository name (a folder with ``_layers``), in distribution's order."""
        base = os.path.join(self.store.base, "repositories")
        names = []
        for folder, dirs, _ in os.walk(base):
            if "_layers" in dirs:
                names.append(os.path.relpath(folder, base).replace(os.sep, "/"))
            dirs[:] = [d for d in dirs if not d.startswith("_")]
        return sorted(names, key=catalog_key)

    # --- tags ---------------------------------------------------------------

    def tags_get(self, name: str, _: str) -> Response:
        tags = self._tags(name)
        # a repository is known here by its tags folder, as distribution knows it (a blob or an upload is not enough)
        if not tags and not os.path.isdir(self.store.tags_dir(name)):
            return oci_error("NAME_UNKNOWN", "repository name not known to registry", {"name": name})
        # OCI 1.1 pages with n and last (distribution 2.8 ignores both and lists every tag, unsorted)
        last = request.args.get("last")
        if last:
            tags = [tag for tag in tags if tag > last]
        headers = {}
        n = request.args.get("n", type=int)
        if n is not None and 0 <= n < len(tags):
            tags = tags[:n]
            if tags:  # n=0 asks for nothing: a Link to the same empty page would never end
                headers["Link"] = f'</v2/{name}/tags/list?{urlencode({"n": n, "last": tags[-1]})}>; rel="next"'
        # no tag is [] (distribution 2.8 sends null, which the spec's list does not allow)
        return Response(json.dumps({"name": name, "tags": tags}), 200, mimetype="application/json", headers=headers)

    def _tags(self, name: str) -> list[str]:
        try:
            entries = os.listdir(self.store.tags_dir(name))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(tag for tag in entries if os.path.exists(self.store.tag_current(name, tag)))


def _type_problem(manifest: dict, content_type: str) -> str | None:
    """Why a manifest pushed as ``content_type`` (parameters dropped) cannot be taken as that type, if it cannot.

    The type must be one this registry serves, and the manifest's own ``mediaType``, when it has one, must be
    the same (OCI distribution 1.1, and distribution 2.8 alike): a body read as one type on push and as
    another on pull is CVE-2021-41190. An OCI manifest or index may leave ``mediaType`` out; a Docker one
    may not (distribution refuses it, as its schema requires the field). Nor may an OCI manifest carry an
    index's ``manifests``, or an OCI index a manifest's ``config`` or ``layers`` (distribution's fix for that
    CVE): without ``mediaType`` the body would be read by its shape as the other type.
    """
    if content_type not in MANIFEST_TYPES:
        return f"manifest Content-Type {content_type[:128]!r} is not a manifest media type this registry serves"
    declared = manifest.get("mediaType")
    if declared is None and content_type in (DOCKER_MANIFEST, DOCKER_LIST):
        return "a Docker manifest must name its mediaType"
    if declared is not None and declared != content_type:
        return f"manifest mediaType {str(declared)[:128]!r} does not match its Content-Type {content_type!r}"
    foreign = {OCI_MANIFEST: ("manifests",), OCI_INDEX: ("config", "layers")}.get(content_type, ())
    if any(manifest.get(field) is not None for field in foreign):
        return f"a manifest pushed as {content_type} has fields of another type ({', '.join(foreign)})"
    return None


def _shape_problem(manifest: dict) -> str | None:
    """What is wrong with the descriptors a manifest names (``config``, ``layers``, ``manifests``), if anything."""
    for key in ("layers", "manifests"):
        items = manifest.get(key)
        if items is not None and not (isinstance(items, list) and all(isinstance(item, dict) for item in items)):
            return f"manifest {key} is not a list of descriptors"
    if manifest.get("config") is not None and not isinstance(manifest["config"], dict):
        return "manifest config is not a descriptor"
    return None


def _subject(manifest: Any) -> str | None:
    """The digest a manifest's ``subject`` descriptor names, if it has one."""
    subject = manifest.get("subject") if isinstance(manifest, dict) else None
    digest = subject.get("digest") if isinstance(subject, dict) else None
    return digest if isinstance(digest, str) and digest else None


def _referrer(manifest: dict, digest: str, size: int, media_type: str) -> dict:
    """A referrer's descriptor (OCI 1.1): its ``artifactType``, else an image manifest's config type, and its
    annotations."""
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    artifact_type = manifest.get("artifactType") or (config.get("mediaType") if media_type == OCI_MANIFEST else None)
    descriptor = {"mediaType": media_type, "digest": digest, "size": size}
    if artifact_type:
        descriptor["artifactType"] = artifact_type
    if manifest.get("annotations"):
        descriptor["annotations"] = manifest["annotations"]
    return descriptor


def _media_type(body: bytes) -> str:
    """The manifest's own ``mediaType``, as distribution answers; OCI types when it has none."""
    try:
        manifest = json.loads(body)
    except ValueError:
        return OCI_MANIFEST
    media_type = manifest.get("mediaType") if isinstance(manifest, dict) else None
    if isinstance(media_type, str) and media_type:
        return media_type
    return OCI_INDEX if isinstance(manifest, dict) and "manifests" in manifest else OCI_MANIFEST


def _blob_created(name: str, digest: str) -> Response:
    return Response(status=201, headers={
        "Location": f"/v2/{name}/blobs/{digest}", "Docker-Content-Digest": digest, "Content-Length": "0",
    })


def _upload_headers(name: str, upload_id: str, size: int) -> dict[str, str]:
    return {
        "Location": f"/v2/{name}/blobs/uploads/{upload_id}",
        "Range": f"0-{max(0, size - 1)}",
        "Docker-Upload-UUID": upload_id,
    }


def _upload_accepted(name: str, upload_id: str, size: int, status: int = 202) -> Response:
    return Response(status=status, headers={**_upload_headers(name, upload_id, size), "Content-Length": "0"})


def _upload_unknown(upload_id: str) -> Response:
    return oci_error("BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry", {"uuid": upload_id[:64]})


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
