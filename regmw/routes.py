"""Parse an OCI distribution API request path into (repository, resource, reference).

The repository name grammar is distribution's reference grammar
(``path-component ('/' path-component)*`` where a component is
``[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*``), at most 255 characters. Anything
that looks like an API request for a repository but whose name does not match
is refused with ``NAME_INVALID``: a name never reaches a storage prefix, a
cache key or a lock key unless it matched this grammar.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import Refusal, name_invalid

MAX_NAME_LENGTH = 255
COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{COMPONENT}(?:/{COMPONENT})*")
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
TAG_RE = re.compile(r"[\w][\w.-]{0,127}")

WRITE_METHODS = frozenset({"PUT", "POST", "PATCH", "DELETE"})

# The part after the repository name, one alternative per resource.
_TAIL = re.compile(
    r"/(?:(?P<manifests>manifests)/(?P<mref>[^/]+)"
    r"|(?P<uploads>blobs/uploads)(?:/(?P<uid>[^/]*))?"
    r"|(?P<blobs>blobs)/(?P<bref>[^/]+)"
    r"|(?P<tags>tags/list)"
    r"|(?P<referrers>referrers)/(?P<rref>[^/]+))$"
)


@dataclass(frozen=True, slots=True)
class Route:
    """What an OCI API request is about.

    ``resource`` is one of ``base``, ``catalog``, ``manifests``, ``blobs``,
    ``uploads``, ``tags``, ``referrers``. ``repository`` is ``None`` for
    ``base`` and ``catalog``. ``reference`` is a tag, a digest or an upload id.
    """

    resource: str
    repository: str | None = None
    reference: str | None = None


class NotAnApiRequest(Exception):
    """The path is outside the OCI API: let it through untouched."""


def parse_path(path: str) -> Route:
    """Parse ``PATH_INFO`` (already percent-decoded by the WSGI server).

    Raises :class:`NotAnApiRequest` for paths outside ``/v2/`` and a
    ``NAME_INVALID`` :class:`~regmw.errors.Refusal` for API paths whose
    repository name breaks the grammar.
    """
    if path in ("/v2", "/v2/"):
        return Route("base")
    if not path.startswith("/v2/"):
        raise NotAnApiRequest(path)
    rest = path[4:]
    if rest in ("_catalog", "_catalog/"):
        return Route("catalog")
    match = _TAIL.search("/" + rest)  # the leading "/" lets an empty name match, then fail the grammar
    if match is None:
        raise _unknown(rest)
    name = rest[: match.start() - 1] if match.start() else ""
    check_name(name)
    groups = match.groupdict()
    if groups["manifests"]:
        return Route("manifests", name, _reference(groups["mref"], name))
    if groups["uploads"]:
        return Route("uploads", name, groups["uid"] or None)
    if groups["blobs"]:
        return Route("blobs", name, _digest(groups["bref"], name))
    if groups["tags"]:
        return Route("tags", name)
    if groups["referrers"]:
        return Route("referrers", name, _digest(groups["rref"], name))
    raise _unknown(rest)  # pragma: no cover - the regex has no other branch


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid repository name, else raise NAME_INVALID."""
    if not name:
        raise name_invalid("repository name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise name_invalid(f"repository name is longer than {MAX_NAME_LENGTH} characters", name[:64] + "...")
    if NAME_RE.fullmatch(name) is None:
        raise name_invalid("repository name does not match the distribution grammar", name)
    return name


def _reference(ref: str, name: str) -> str:
    if ":" in ref:
        return _digest(ref, name)
    if TAG_RE.fullmatch(ref) is None:
        raise Refusal(400, "TAG_INVALID", "manifest tag is invalid", detail={"name": name, "tag": ref[:128]})
    return ref


def _digest(ref: str, name: str) -> str:
    if DIGEST_RE.fullmatch(ref) is None:
        raise Refusal(400, "DIGEST_INVALID", "digest is invalid", detail={"name": name, "digest": ref[:128]})
    return ref


def _unknown(rest: str) -> Refusal:
    # An API path we cannot place: say so rather than passing an unchecked name downstream.
    return Refusal(404, "NAME_UNKNOWN", "unknown API path", detail={"path": "/v2/" + rest[:256]})
