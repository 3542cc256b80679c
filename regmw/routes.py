"""Parse an OCI distribution API request path into (repository, resource, reference).

Every element is checked against the distribution grammar, in ASCII only:

* repository name: ``path-component ('/' path-component)*``, a component being
  ``[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*``, at most 255 characters;
* tag: ``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}``;
* digest: ``algorithm ":" encoded`` (OCI image spec), and for the registered
  algorithms the exact encoding (sha256: 64 lower-case hex digits, sha512: 128);
* upload id: an opaque token of safe characters (``[A-Za-z0-9._~=+-]``, no
  ``..``, at most 256), so it can never be a dot segment, hide a separator or
  carry a control character into a storage path, a log line or a header.

Patterns are matched whole (``fullmatch`` / ``\\Z``), so a trailing newline
never matches, and with ASCII classes only (no ``\\w``), so ``%C2%AA`` is not a
tag. A name, tag, digest or upload id never reaches a storage prefix, a cache
key or a lock key unless it matched.

Percent-decoding follows RFC 3986: the raw request target is split on ``/``
first and each segment decoded after, so ``%2E`` is a dot (and ``%2E%2E`` a dot
segment, refused like ``..``) while an encoded ``/`` or ``\\`` is refused: the
app or an upstream would otherwise see a different path than the one checked
here.

What a refusal answers:

* a bad repository name: ``400 NAME_INVALID``;
* a manifest read (GET/HEAD) whose reference breaks the grammar: ``404
  MANIFEST_UNKNOWN``, as a registry answers for a manifest it does not hold
  (:class:`UnknownReference`; an app that is itself a registry front, the
  gateway, may take the read and forward it instead);
* on a write: ``400 TAG_INVALID`` / ``DIGEST_INVALID`` / ``BLOB_UPLOAD_INVALID``;
* an upload status read with a malformed id: ``404 BLOB_UPLOAD_UNKNOWN``.
"""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from .errors import Refusal, name_invalid

MAX_NAME_LENGTH = 255
COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{COMPONENT}(?:/{COMPONENT})*", re.ASCII)
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", re.ASCII)
DIGEST_RE = re.compile(r"(?P<algorithm>[a-z0-9]+(?:[+._-][a-z0-9]+)*):(?P<encoded>[a-zA-Z0-9=_-]+)", re.ASCII)
#: Registered algorithms and the exact encoding each allows (OCI image spec, descriptor.md).
REGISTERED_DIGESTS = {
    "sha256": re.compile(r"[a-f0-9]{64}", re.ASCII),
    "sha512": re.compile(r"[a-f0-9]{128}", re.ASCII),
    "blake3": re.compile(r"[a-f0-9]{64}", re.ASCII),
}
UPLOAD_ID_RE = re.compile(r"[A-Za-z0-9._~=+-]{1,256}", re.ASCII)

WRITE_METHODS = frozenset({"PUT", "POST", "PATCH", "DELETE"})
READ_METHODS = frozenset({"GET", "HEAD"})

@dataclass(frozen=True, slots=True)
class Route:
    """What an OCI API request is about.

    ``resource`` is one of ``base``, ``catalog``, ``manifests``, ``blobs``,
    ``uploads``, ``tags``, ``referrers``. ``repository`` is ``None`` for
    ``base`` and ``catalog``. ``reference`` is a tag, a digest or an upload id,
    always one that matched its grammar (``None`` when there is none, or for a
    manifest read forwarded as :class:`UnknownReference`).
    """

    resource: str
    repository: str | None = None
    reference: str | None = None


class NotAnApiRequest(Exception):
    """The path is outside the OCI API: let it through untouched."""


class UnknownReference(Refusal):
    """A manifest read whose reference breaks the grammar: no registry holds it.

    It answers ``404 MANIFEST_UNKNOWN``. ``route`` is the request with
    ``reference=None`` and ``forwardable`` says whether the raw reference is one
    plain segment (no encoded separator, not a dot segment), so that an app
    which is a registry front can forward the read unchanged and let its
    upstream answer.
    """

    def __init__(self, route: Route, reference: str, forwardable: bool) -> None:
        super().__init__(404, "MANIFEST_UNKNOWN", "manifest unknown",
                         detail={"name": route.repository, "reference": _shown(reference)})
        self.route = route
        self.forwardable = forwardable


def parse_request(environ: dict) -> Route:
    """Parse a WSGI request: its path segments (see :func:`path_segments`) and method."""
    return parse_segments(path_segments(environ), environ.get("REQUEST_METHOD", "GET").upper())


def parse_path(path: str, method: str = "GET") -> Route:
    """Parse a decoded path (``PATH_INFO``) on its own, without the raw request target."""
    return parse_segments(path.split("/"), method)


def parse_segments(segments: list[str], method: str = "GET") -> Route:
    """Parse decoded path segments (``["", "v2", ...]``; a segment may hold a decoded ``/``).

    Raises :class:`NotAnApiRequest` for paths outside ``/v2/`` and a
    :class:`~regmw.errors.Refusal` for API paths that break the grammar.
    """
    if len(segments) < 2 or segments[0] != "" or segments[1] != "v2":
        if len(segments) >= 2 and segments[0] == "" and segments[1].startswith(("v2/", "v2\\")):
            # "/v2%2Fgroup/app/..." decodes to an API path: passed through unchecked, the app or
            # an upstream would serve it without a name check, a limit, a lock or a classification.
            raise name_invalid("encoded '/' or '\\' in the path is not allowed")
        raise NotAnApiRequest("/".join(segments))
    rest = segments[2:]
    if len(rest) < 2:
        if rest in ([], [""]):
            return Route("base")
        if rest == ["_catalog"]:
            return Route("catalog")
        raise _unknown("/".join(rest))
    # Every other form ends in "<kind>/<last>": dispatched on those two segments, without
    # building a slice per form tried (this runs on every API request).
    kind, last = rest[-2], rest[-1]
    if kind == "uploads" and len(rest) >= 3 and rest[-3] == "blobs":
        return _route("uploads", rest[:-3], last or None, method)  # ".../blobs/uploads/<id>"; "" is no id
    if kind == "blobs" and last == "uploads":
        return _route("uploads", rest[:-2], None, method)
    if kind == "tags" and last == "list":
        return _route("tags", rest[:-2], None, method)
    if kind in ("manifests", "blobs", "referrers") and last:
        return _route(kind, rest[:-2], last, method)
    if rest == ["_catalog", ""]:
        return Route("catalog")
    raise _unknown("/".join(rest))


def _route(resource: str, name_segments: list[str], ref: str | None, method: str) -> Route:
    name = "/".join(name_segments)
    if "\\" in name or (name_segments and name.count("/") != len(name_segments) - 1):  # an encoded / or \ in a segment
        raise name_invalid("encoded '/' or '\\' in a repository name is not allowed", _shown(name))
    name = check_name(name)
    if ref is None:
        return Route(resource, name)
    if resource == "manifests":
        return Route(resource, name, _manifest_reference(ref, name, method))
    if resource == "uploads":
        return Route(resource, name, _upload_id(ref, name, method))
    return Route(resource, name, _digest(ref, name))


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid repository name, else raise NAME_INVALID."""
    if not name:
        raise name_invalid("repository name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise name_invalid(f"repository name is longer than {MAX_NAME_LENGTH} characters", name[:64] + "...")
    if NAME_RE.fullmatch(name) is None:
        raise name_invalid("repository name does not match the distribution grammar", _shown(name))
    return name


def reaches_api(path: str) -> bool:
    """Whether ``path`` is an API path once an app or an upstream normalises it (dot segments, repeated ``/``)."""
    normalised = posixpath.normpath("/" + path.lstrip("/"))
    return normalised == "/v2" or normalised.startswith("/v2/")


def check_script_name(script: str, path: str) -> None:
    """Refuse (NAME_INVALID) an API path that starts in ``SCRIPT_NAME`` (``script``) instead of ``PATH_INFO``.

    regmw checks ``PATH_INFO``; the gateway forwards ``SCRIPT_NAME + PATH_INFO``,
    and gunicorn takes ``SCRIPT_NAME`` from a request header of a peer in its
    ``forwarded_allow_ips`` (loopback by default). ``/v2/team/app`` there and
    ``/manifests/latest`` in ``PATH_INFO`` reached the upstream as an API call no
    check, limit or lock saw; ``/v2/other`` there made it act on another
    repository than the one checked. A mount prefix (``/registry``) never starts one.
    """
    if reaches_api(script + path):
        raise name_invalid("an API path must not start in SCRIPT_NAME (a mount prefix)")


def valid_tag(tag: str) -> bool:
    return TAG_RE.fullmatch(tag) is not None


def valid_digest(digest: str) -> bool:
    """True if ``digest`` matches the OCI digest grammar, and a registered algorithm's encoding."""
    match = DIGEST_RE.fullmatch(digest)
    if match is None:
        return False
    encoding = REGISTERED_DIGESTS.get(match["algorithm"])
    return encoding is None or encoding.fullmatch(match["encoded"]) is not None


def valid_upload_id(upload_id: str) -> bool:
    return UPLOAD_ID_RE.fullmatch(upload_id) is not None and ".." not in upload_id and upload_id != "."


def _manifest_reference(ref: str, name: str, method: str) -> str:
    if valid_digest(ref) if ":" in ref else valid_tag(ref):
        return ref
    if method in READ_METHODS:
        forwardable = ref not in (".", "..") and "/" not in ref and "\\" not in ref
        raise UnknownReference(Route("manifests", name), ref, forwardable)
    if ":" in ref:
        raise Refusal(400, "DIGEST_INVALID", "digest is invalid", detail={"name": name, "digest": _shown(ref)})
    raise Refusal(400, "TAG_INVALID", "manifest tag is invalid", detail={"name": name, "tag": _shown(ref)})


def _digest(ref: str, name: str) -> str:
    if not valid_digest(ref):
        raise Refusal(400, "DIGEST_INVALID", "digest is invalid", detail={"name": name, "digest": _shown(ref)})
    return ref


def _upload_id(ref: str, name: str, method: str) -> str:
    if valid_upload_id(ref):
        return ref
    detail = {"name": name, "uuid": _shown(ref)}
    if method in READ_METHODS:  # an id that cannot exist is unknown, as for any other id
        raise Refusal(404, "BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry", detail=detail)
    raise Refusal(400, "BLOB_UPLOAD_INVALID", "upload id is invalid", detail=detail)


def _unknown(rest: str) -> Refusal:
    # An API path we cannot place: say so rather than passing an unchecked name downstream.
    return Refusal(404, "NAME_UNKNOWN", "unknown API path", detail={"path": "/v2/" + _shown(rest, 256)})


def _shown(text: str, limit: int = 128) -> str:
    """Client text echoed in an error detail: cut short, control characters escaped."""
    text = text[:limit]
    return text if text.isprintable() and text.isascii() else text.encode("unicode_escape").decode("ascii")


# --- percent-decoding (RFC 3986) --------------------------------------------------

_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_ENCODED_SEPARATOR = re.compile(r"%(?:2[Ff]|5[Cc])")


def path_segments(environ: dict) -> list[str]:
    """The request path as decoded segments, split on ``/`` before decoding (RFC 3986).

    WSGI servers hand over ``PATH_INFO`` already decoded, which hides an encoded
    ``/`` (``a%2Fb`` and ``a/b`` look the same). When the server also keeps the
    raw target (``RAW_URI`` in gunicorn, ``REQUEST_URI``/``RAW_URI`` in
    werkzeug) and it decodes to ``SCRIPT_NAME + PATH_INFO``, the segments come
    from the raw target, so a segment holding ``/`` is one the client encoded.
    Otherwise (no raw target, or a middleware in front rewrote the path) the
    segments are ``PATH_INFO`` split on ``/``, and an API path whose raw target
    holds an encoded ``/`` or ``\\`` is refused (``NAME_INVALID``), since the
    segment it belongs to cannot be told. Decoded bytes are kept as latin-1
    code points, like ``PATH_INFO``.
    """
    path = environ.get("PATH_INFO") or "/"
    script = environ.get("SCRIPT_NAME", "")
    if script:
        check_script_name(script, path)
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        raw_path = _target_path(raw)
        segments = [_decode(segment) for segment in raw_path.split("/")]
        if "/".join(segments) == script + path:
            skip = script.count("/")
            if skip == 0 or "/".join(segments[: skip + 1]) == script:
                return [""] + segments[skip + 1:] if skip else segments
        if _ENCODED_SEPARATOR.search(raw_path) and (path == "/v2" or path.startswith("/v2/")):
            # The raw target does not decode to PATH_INFO (a middleware in front rewrote it, or
            # the server replaced bytes that are not UTF-8): an encoded / or \ cannot be placed.
            raise name_invalid("encoded '/' or '\\' in the path is not allowed")
    return path.split("/")


def _target_path(raw: str) -> str:
    """The path of a raw request target (origin-form, or absolute-form ``http://host/path``)."""
    path = raw.split("?", 1)[0].split("#", 1)[0]
    if "://" in path[:10]:
        after = path.split("://", 1)[1]
        path = "/" + after.split("/", 1)[1] if "/" in after else "/"
    return path


def _decode(segment: str) -> str:
    if "%" not in segment:
        return segment
    return _PERCENT.sub(lambda m: chr(int(m.group(1), 16)), segment)
