"""The per-request context that travels in ``environ["regmw.context"]``.

It carries what was parsed from the request and every decision the hooks made
(admission, old/new path, database handle) so the app reads decisions instead
of recomputing them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from .routes import WRITE_METHODS, Route, check_name

if TYPE_CHECKING:
    from .backends import Services

_UNSET = object()


class RequestContext:
    __slots__ = (
        "_claims",
        "_client",
        "db",
        "environ",
        "is_write",
        "method",
        "migration_path",
        "prefetched",
        "response_headers",
        "route",
        "services",
        "status",
    )

    def __init__(self, environ: dict, route: Route, services: Services) -> None:
        self.environ = environ
        self.method: str = environ.get("REQUEST_METHOD", "GET").upper()
        self.route = route
        self.is_write: bool = self.method in WRITE_METHODS
        self.services = services
        self.migration_path: str | None = None  # "old" / "new" once classified
        self.db: Any = None
        self.prefetched: dict[str, bytes | None] = {}  # cache values read during admission
        self.response_headers: list[tuple[str, str]] = []  # added to whatever answer is sent, replacing the same names
        self.status: int | None = None
        self._claims: Any = _UNSET
        self._client: str | None = None

    @property
    def repository(self) -> str | None:
        return self.route.repository

    @property
    def resource(self) -> str:
        return self.route.resource

    @property
    def reference(self) -> str | None:
        return self.route.reference

    @property
    def client(self) -> str:
        """The client's rate-limit identity (see :mod:`regmw.clients`)."""
        if self._client is None:
            self._client = self.services.clients.client_key(self.environ)
        return self._client

    @property
    def token_claims(self) -> dict[str, Any] | None:
        """Claims of the bearer token, only if it verified; computed once, on first use."""
        if self._claims is _UNSET:
            verifier = self.services.token_verifier
            header = self.environ.get("HTTP_AUTHORIZATION")
            self._claims = verifier.verify(header) if verifier is not None and header else None
        return self._claims

    @property
    def subject(self) -> str | None:
        claims = self.token_claims
        return str(claims["sub"]) if claims and claims.get("sub") else None

    @property
    def mount_from(self) -> str | None:
        """For a cross-repository blob mount (``POST .../uploads/?mount=D&from=R``), the source R."""
        if self.route.resource != "uploads" or self.method != "POST":
            return None
        query = parse_qs(self.environ.get("QUERY_STRING", ""))
        source = query.get("from", [None])[0]
        if not source or "mount" not in query:
            return None
        return check_name(source)  # a bad name is refused (NAME_INVALID), never looked up

    def __repr__(self) -> str:
        return f"<RequestContext {self.method} {self.route} path={self.migration_path}>"
