"""``/v2/_catalog`` in old/new gateway mode: merged from two real docker-registry upstreams,
sorted, deduplicated, paged with ``n``/``last`` and a ``Link`` header like one registry."""
from __future__ import annotations

import hashlib
import json
import re
from urllib.parse import urlsplit

import pytest

from regmw import RegistryMiddleware, build, hookimpl
from regmw.demo.registry import create_app
from regmw.catalog import _Upstream, catalog_key, merge_pages
from regmw.gateway import create_gateway
from tests.servers._util import http_request as request

# Names where distribution's order (component by component, "/" first) and plain string order differ:
# "g/seven" < "g-eight" < "g.nine" < "gz" in the first, the other way round in the second.
OLD = ["a/one", "c/three", "shared/x", "e/five", "g/seven", "g-eight"]
NEW = ["b/two", "d/four", "shared/x", "f/six", "g.nine", "g/seven/sub", "gz"]
EXPECTED = sorted(set(OLD) | set(NEW), key=catalog_key)


class ByPrefix:
    @hookimpl
    def regmw_classify(self, context):
        return "new" if context.repository in NEW else "old"




def push_blob(url: str, name: str) -> None:
    """A two-step blob push straight to docker-registry: enough for the repository to exist."""
    status, headers, _ = request(url, "POST", f"/v2/{name}/blobs/uploads/")
    assert status == 202
    location = urlsplit(headers["Location"])
    digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
    target = f"{location.path}?{location.query}&digest={digest}"
    assert request(url, "PUT", target, name.encode(), {"Content-Type": "application/octet-stream"})[0] == 201


@pytest.fixture
def migrating_gateway(tmp_path, make_docker_registry, serve_wsgi):
    old, new = make_docker_registry(), make_docker_registry()
    for name in OLD:
        push_blob(old.url, name)
    for name in NEW:
        push_blob(new.url, name)
    runtime = build({"regmw": {"entry_points": False}, "storage": {"root": str(tmp_path)},
                     "gateway": {"old_upstream": old.url, "new_upstream": new.url}},
                    environ={}, plugins=[ByPrefix()])
    app, apps = create_gateway(runtime.config)
    yield serve_wsgi(RegistryMiddleware(app, runtime, apps=apps)), old
    app.close()


def catalog(url: str, query: str = ""):
    status, headers, body = request(url, "GET", "/v2/_catalog" + (f"?{query}" if query else ""))
    return status, headers.get("Link"), json.loads(body)


@pytest.mark.services
def test_catalog_lists_both_upstreams_sorted_once(migrating_gateway):
    url, old = migrating_gateway
    status, link, body = catalog(url)
    assert status == 200 and body == {"repositories": EXPECTED} and link is None
    assert EXPECTED.index("g/seven/sub") < EXPECTED.index("g-eight") < EXPECTED.index("g.nine")
    # the old upstream alone knows only its own, in the order the merge keeps
    assert catalog(old.url)[2] == {"repositories": sorted(OLD, key=catalog_key)}


@pytest.mark.services
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_catalog_pages_with_n_last_and_link(migrating_gateway, n):
    url, _ = migrating_gateway
    expected = EXPECTED
    seen, query, pages = [], f"n={n}", 0
    while query is not None:
        status, link, body = catalog(url, query)
        assert status == 200 and len(body["repositories"]) <= n
        seen += body["repositories"]
        pages += 1
        if link is None:
            query = None
        else:
            match = re.fullmatch(r'</v2/_catalog\?(last=[^&>]+&n=\d+)>; rel="next"', link)
            assert match, link
            query = match.group(1)
        assert pages <= len(expected) + 1
    assert seen == expected
    assert pages == -(-len(expected) // n) or pages == len(expected) // n + 1  # full pages, maybe one empty


@pytest.mark.services
def test_catalog_last_and_bad_n(migrating_gateway):
    url, _ = migrating_gateway
    assert catalog(url, "last=d/four")[2]["repositories"] == [
        "e/five", "f/six", "g/seven", "g/seven/sub", "g-eight", "g.nine", "gz", "shared/x"]
    assert catalog(url, "n=2&last=g%2Fseven%2Fsub")[2]["repositories"] == ["g-eight", "g.nine"]
    assert catalog(url, "n=2&last=c%2Fthree")[2]["repositories"] == ["d/four", "e/five"]
    assert catalog(url, "n=0")[:3:2] == (200, {"repositories": []})
    status, _, body = catalog(url, "n=1001")
    assert status == 400 and body["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"


def test_merge_asks_again_when_an_upstream_pages_short():
    """An upstream whose pages are shorter than asked is read on until the merge can decide."""
    data = {"old": ["a", "c", "e", "g", "i"], "new": ["b", "c", "d", "h"]}
    calls = []

    def fetch(upstream, count):
        names = [name for name in data[upstream.app] if upstream.cursor is None or name > upstream.cursor]
        page = names[:min(count, 2)]  # this upstream never returns more than 2
        calls.append((upstream.app, upstream.cursor, count))
        return page, len(names) > len(page)

    def merged(n, last=None):
        return merge_pages([_Upstream("old", [], last), _Upstream("new", [], last)], n, fetch)

    assert merged(100) == (["a", "b", "c", "d", "e", "g", "h", "i"], False)
    assert merged(3) == (["a", "b", "c"], True)
    assert merged(3, "c") == (["d", "e", "g"], True)
    assert merged(5, "g") == (["h", "i"], False)
    calls.clear()
    merged(1)
    assert len(calls) == 2  # one page from each is enough for one name


def test_merge_keeps_distributions_order_where_slash_sorts_first():
    """Upstreams list in component order ("a/b" < "a-c"); the merge and its cursor keep that order.

    In plain string order "a-c" < "a/b", so a merge sorted that way skipped "a-c" and
    everything after "a/b" on the second page (asking for names after the wrong one).
    """
    data = {"old": ["a/b", "a/b/c", "a-d", "ab"], "new": ["a/bb", "a-c", "a.e"]}

    def fetch(upstream, count):
        cursor = upstream.cursor
        names = [name for name in data[upstream.app] if cursor is None or catalog_key(name) > catalog_key(cursor)]
        return names[:count], len(names) > count

    def merged(n, last=None):
        return merge_pages([_Upstream("old", [], last), _Upstream("new", [], last)], n, fetch)

    everything = ["a/b", "a/b/c", "a/bb", "a-c", "a-d", "a.e", "ab"]
    assert merged(100) == (everything, False)
    pages, last = [], None
    while True:
        names, more = merged(2, last)
        pages.append(names)
        if not more:
            break
        last = names[-1]
    assert pages == [["a/b", "a/b/c"], ["a/bb", "a-c"], ["a-d", "a.e"], ["ab"]]


@pytest.mark.services
def test_reference_registry_catalog_pages_as_docker_registry_does(tmp_path, docker_registry, serve_wsgi):
    """The bundled registry (``regmw demo``) answers ``/v2/_catalog`` page for page as distribution does."""
    reference = serve_wsgi(create_app(str(tmp_path / "reference")))
    for name in OLD + NEW:
        push_blob(docker_registry.url, name)
        push_blob(reference, name)
    # n as Go's strconv.Atoi reads it: "+3" is 3; " 3" ("+" in a query is a space), "3 ", "0_3", "\n3"
    # and a digit of another script (U+0663) are not numbers (100 names), though Python's int() takes them.
    for query in ["", "n=1", "n=2", "n=3", "last=g%2Fseven", "n=2&last=g-eight", "n=0", "n=1001", "n=abc",
                  "n=%2B3", "n=+3", "n=3%20", "n=0_3", "n=%0A3", "n=%D9%A3"]:
        while True:
            real, ours = catalog(docker_registry.url, query), catalog(reference, query)
            assert ours == real, query
            if real[1] is None:
                break
            query = re.fullmatch(r'</v2/_catalog\?(last=[^&>]+&n=\d+)>; rel="next"', real[1]).group(1)


@pytest.mark.parametrize(("stall", "status"), [(False, 502), (True, 504)], ids=["cut-short", "stalled"])
def test_a_catalog_page_an_upstream_breaks_off_is_502_or_504(serve_wsgi, stall, status):
    """The page is read in-process, before any status goes out: an upstream that sends part of it and hangs
    up (or goes silent) is the gateway's 502 (504), as before the first byte, not the app error's 500."""
    from tests.test_gateway import RawUpstream

    whole = RawUpstream(b'HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{"repositories":[]}\n')
    broken = RawUpstream(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"repositories":[', stall=stall)
    runtime = build({"regmw": {"entry_points": False},
                     "gateway": {"old_upstream": whole.url, "new_upstream": broken.url, "timeout": 0.5}}, environ={})
    app, apps = create_gateway(runtime.config)
    try:
        answer, _headers, body = request(serve_wsgi(RegistryMiddleware(app, runtime, apps=apps)), "GET", "/v2/_catalog")
        assert answer == status and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    finally:
        app.close()
        whole.close()
        broken.close()
