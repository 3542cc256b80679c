"""``/v2/_catalog`` across the old and new upstreams of a migration, as one registry.

Why: during a storage migration a repository lives in the old registry or the
new one, and a client listing the catalog must see both, once each, in order,
with the paging a single registry offers (``n``, ``last``, a ``Link`` header
to the next page), or it would miss every repository already migrated.

How: :class:`MergedCatalog` wraps the gateway app that serves unclassified
requests and answers ``GET /v2/_catalog`` itself. For a page of ``n`` after
``last`` it asks each upstream for ``n`` after ``last`` (the first ``n`` of the
union are among the first ``n`` of each), merges the sorted lists, drops
duplicates, and asks an upstream again only when its page ran out before the
merge could decide (an upstream that pages by less than ``n``). The upstreams
are called as WSGI apps with the client's own headers (its Authorization
included), so whatever transport the gateway uses is used here too.

Names are ordered as distribution orders them, component by component (``/``
sorts before every other character: ``a/b`` < ``a/b/c`` < ``a-c`` < ``ab``),
not as plain strings: ``last`` is a position in that order, so a merge in
another order would ask an upstream for the names after the wrong one and skip
some (:func:`catalog_key`).

Paging follows distribution: ``n`` absent or not a number gives 100 entries,
``n`` above 1000 is ``400 PAGINATION_NUMBER_INVALID``, and ``Link:
</v2/_catalog?last=L&n=N>; rel="next"`` is sent when more may follow. An
upstream that refuses (401, 5xx...) is answered as it answered: a partial
catalog would be a wrong one.
"""
from __future__ import annotations

import http.client
import io
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode

from .errors import UPSTREAM_TIMED_OUT, Refusal

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]

DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_BODY = 8 * 1024 * 1024  # a 1000-entry page of 255-character names is ~260 KB
_ATOI = re.compile(r"[+-]?[0-9]+", re.ASCII)

#: ``gunicorn.socket`` too: a gateway splices a large body straight into that socket (regmw.gateway),
#: and a page read here must come back as bytes, never reach the client on its own.
_NOT_FORWARDED = ("wsgi.input", "CONTENT_LENGTH", "CONTENT_TYPE", "HTTP_TRANSFER_ENCODING", "HTTP_CONTENT_LENGTH",
                  "gunicorn.socket")


def page_size(value: str | None) -> int:
    """A catalog request's ``n`` as distribution reads it: absent, not a number or negative is 100.

    A number is what Go's ``strconv.Atoi`` reads: ASCII digits after an optional
    sign. Python's ``int()`` also takes surrounding spaces (``n=+3`` in a query is
    a space and 3), ``_`` and other scripts' digits, which distribution answers
    with 100 names.
    """
    if not value or _ATOI.fullmatch(value) is None:
        return DEFAULT_PAGE
    try:
        n = int(value)
    except ValueError:  # more digits than int() converts (4300)
        return DEFAULT_PAGE
    return DEFAULT_PAGE if n < 0 else n


def catalog_key(name: str) -> str:
    """The sort key of a repository name in a catalog: distribution's ``lessPath``, where ``/`` sorts first."""
    return name.replace("/", "\x00")


@dataclass
class _Answer:
    """One upstream answer that is not a catalog page: relayed to the client as it came."""

    status: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class _Upstream:
    app: WSGIApp
    buffer: list[str]
    cursor: str | None
    exhausted: bool = False


class MergedCatalog:
    """A WSGI app: ``GET /v2/_catalog`` merged from ``sources``; every other request goes to ``app``.

    ``app``: the gateway for unclassified requests, e.g. the old upstream's.
    ``sources``: the upstream apps whose catalogs are merged, e.g. ``[old, new]``.
    """

    def __init__(self, app: WSGIApp, sources: Sequence[WSGIApp]) -> None:
        self.app = app
        self.sources = list(sources)
        # /-/regmw/ready asks the sources as upstream_old / upstream_new; the app of unclassified
        # requests is asked as ``upstream`` when it is a registry of its own (``[gateway] upstream``).
        probe = getattr(app, "ready", None)
        if callable(probe) and all(app is not source for source in self.sources):
            self.ready = probe

    @property
    def forwards_unknown_references(self) -> bool:
        return getattr(self.app, "forwards_unknown_references", False)

    def close(self) -> None:
        for each in {id(a): a for a in (self.app, *self.sources)}.values():
            close = getattr(each, "close", None)
            if close is not None:
                close()

    def __repr__(self) -> str:
        return f"<MergedCatalog of {self.sources!r}>"

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in ("/v2/_catalog", "/v2/_catalog/") or environ.get("REQUEST_METHOD", "GET").upper() != "GET":
            return self.app(environ, start_response)
        query = parse_qs(environ.get("QUERY_STRING", ""))
        last = query.get("last", [""])[0] or None
        n = page_size(query.get("n", [""])[0])
        if n > MAX_PAGE:
            refusal = Refusal(400, "PAGINATION_NUMBER_INVALID", "invalid number of results requested", detail={"n": n})
            return refusal(environ, start_response)
        result = merge_pages([_Upstream(source, [], last) for source in self.sources], n,
                             lambda upstream, count: self._fetch(upstream, environ, count))
        if isinstance(result, _Answer):
            start_response(result.status, result.headers)
            return [result.body]
        if isinstance(result, Refusal):
            return result(environ, start_response)
        repositories, more = result
        body = json.dumps({"repositories": repositories}).encode()
        headers = [("Content-Type", "application/json; charset=utf-8"), ("Content-Length", str(len(body))),
                   ("Docker-Distribution-API-Version", "registry/2.0")]
        if more and repositories:
            headers.append(("Link", f'</v2/_catalog?{urlencode({"last": repositories[-1], "n": n})}>; rel="next"'))
        start_response("200 OK", headers)
        return [body]

    def _fetch(self, upstream: _Upstream, environ: dict, count: int) -> tuple[list[str], bool] | _Answer | Refusal:
        """One page of ``count`` names after ``upstream.cursor``, and whether the upstream says more follow."""
        query = {"n": count, **({"last": upstream.cursor} if upstream.cursor else {})}
        sub = {key: value for key, value in environ.items() if key not in _NOT_FORWARDED}
        sub.update({"REQUEST_METHOD": "GET", "QUERY_STRING": urlencode(query), "wsgi.input": io.BytesIO(b""),
                    "PATH_INFO": "/v2/_catalog"})
        sub.pop("RAW_URI", None)
        sub.pop("REQUEST_URI", None)
        answer = _call(upstream.app, sub)
        if isinstance(answer, Refusal) or not answer.status.startswith("200"):
            return answer
        try:
            names = json.loads(answer.body)["repositories"] or []
            if not all(isinstance(name, str) for name in names):
                raise TypeError("repository names must be strings")
        except (ValueError, KeyError, TypeError) as exc:
            return Refusal(502, "UNAVAILABLE", f"upstream catalog is not a catalog: {exc}")
        linked = any(name.lower() == "link" and 'rel="next"' in value for name, value in answer.headers)
        return sorted(names, key=catalog_key), linked or len(names) >= count > 0


def merge_pages(upstreams: list[_Upstream], n: int,
                fetch: Callable[[_Upstream, int], Any]) -> tuple[list[str], bool] | _Answer | Refusal:
    """The first ``n`` names of the union of the upstreams' sorted catalogs, and whether more may follow.

    A k-way merge: an upstream is asked for more only when its buffer is empty
    and it may have more, so a name is emitted only once every upstream that
    could still hold a smaller one has shown its next name.
    """
    result: list[str] = []
    while len(result) < n:
        for upstream in upstreams:
            if not upstream.buffer and not upstream.exhausted:
                page = fetch(upstream, n - len(result))
                if isinstance(page, (_Answer, Refusal)):
                    return page
                names, more = page
                if upstream.cursor is not None:
                    cursor = catalog_key(upstream.cursor)
                    names = [name for name in names if catalog_key(name) > cursor]
                upstream.buffer = names
                upstream.exhausted = not names or not more
                if names:
                    upstream.cursor = names[-1]
        heads = [upstream.buffer[0] for upstream in upstreams if upstream.buffer]
        if not heads:
            break
        smallest = min(heads, key=catalog_key)
        for upstream in upstreams:
            if upstream.buffer and upstream.buffer[0] == smallest:
                upstream.buffer.pop(0)
        result.append(smallest)
    more = any(upstream.buffer or not upstream.exhausted for upstream in upstreams)
    return result, more


def _call(app: WSGIApp, environ: dict) -> _Answer | Refusal:
    """Call a WSGI app in-process and collect its whole (small, bounded) answer."""
    captured: dict[str, Any] = {}
    chunks: list[bytes] = []

    def start_response(status: str, headers: list, exc_info: Any = None) -> Callable[[bytes], None]:
        captured["status"], captured["headers"] = status, list(headers)
        return chunks.append

    body = app(environ, start_response)
    size = 0
    try:
        for chunk in body:
            size += len(chunk)
            if size > MAX_BODY:
                return Refusal(502, "UNAVAILABLE", "upstream catalog page is too large")
            chunks.append(chunk)
    # A page the upstream cuts short or stops sending: the gateway's body breaks off as it does to break a
    # client's connection, but no status is out yet here; raised on, it was the app error's 500 and traceback.
    except TimeoutError:
        return UPSTREAM_TIMED_OUT
    except (OSError, http.client.HTTPException):
        return Refusal(502, "UNAVAILABLE", "upstream catalog page broke off")
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return _Answer(captured["status"], captured["headers"], b"".join(chunks))
