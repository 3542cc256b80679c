"""A repository is not the folder of its children (issue 15), and a malformed GCS answer is never a route.

Repository names nest: ``nest/app`` and ``nest/app/builder`` are two
repositories, each with its own layout. Every combination of the parent's and
the child's layout is routed through the real middleware, on the GCS emulator
(counting the HTTP requests the official client sends) and on the filesystem
(counting ``scandir`` calls), and each repository must be routed by its OWN
entries with one storage request per prefix asked. Child names starting with
a digit are covered: ``0`` sorts before ``_``, so on real GCS a one-item list
of ``<parent>/`` would show the child first.

Then a fake GCS endpoint (a real HTTP server on loopback) answers list
requests in shapes the API does not promise: each must be a 503 with
Retry-After, and nothing may be cached.
"""
from __future__ import annotations

import itertools
import json
import os
from urllib.parse import parse_qs, urlsplit

import pytest
from werkzeug.test import Client

from regmw import RegistryMiddleware
from tests.servers.gcs_emulator import count_requests
from tests.test_classification import (
    NEW_ROOT, OLD_ROOT, RecordingCachePlugin, assert_unavailable, named_app, repo_objects,
)

PARENT = "nest/app"
CHILD_NAMES = ("builder", "0builder")  # "0builder/" sorts before "_layers/"

#: layout name → the roots the repository's objects live under
LAYOUTS = {"old": (OLD_ROOT,), "new": (NEW_ROOT,), "both": (OLD_ROOT, NEW_ROOT), "neither": ()}

#: layout → (path, storage requests) for a cold classification without a token flag
EXPECTED = {"old": ("old", 1), "new": ("new", 2), "both": ("old", 1), "neither": ("old", 2)}

CASES = [
    pytest.param(parent, child, name, id=f"parent-{parent}-child-{child}-{name}")
    for parent, child in itertools.product(LAYOUTS, LAYOUTS)
    for name in CHILD_NAMES
]


def objects_for(parent: str, child: str, child_name: str) -> list[str]:
    names = [path for root in LAYOUTS[parent] for path in repo_objects(root, PARENT)]
    names += [path for root in LAYOUTS[child] for path in repo_objects(root, f"{PARENT}/{child_name}")]
    return names


def own_entries(root: str, repository: str) -> str:
    return f"{root}/repositories/{repository}/_"


def asked(layout: str, repository: str) -> list[str]:
    """The prefixes a cold classification of a repository in ``layout`` asks, in order."""
    old = [own_entries(OLD_ROOT, repository)]
    return old if EXPECTED[layout][1] == 1 else [*old, own_entries(NEW_ROOT, repository)]


def middleware(config: dict, cache_plugin: RecordingCachePlugin) -> Client:
    apps = {"old": named_app("old"), "new": named_app("new")}
    return Client(RegistryMiddleware(named_app("main"), config, apps=apps, plugins=[cache_plugin], environ={}))


def routed_to(response) -> str:
    assert response.status_code == 200, response.data
    assert response.headers["X-App"] == response.headers["Regmw-Migration-Path"]
    return response.headers["X-App"]


# --- parent and child in every combination of layouts -----------------------------------------


@pytest.mark.parametrize(("parent", "child", "child_name"), CASES)
def test_each_repository_is_routed_by_its_own_entries_on_gcs(gcs_emulator, parent, child, child_name):
    gcs_emulator.put(*objects_for(parent, child, child_name))
    config = {
        "regmw": {"plugins": ["gcs", "migration"], "entry_points": False},
        "gcs": gcs_emulator.gcs_section(),
        "migration": {"old_root": OLD_ROOT, "new_root": NEW_ROOT},
    }
    client = middleware(config, RecordingCachePlugin())
    storage = client.application.services.storage
    log = count_requests(storage.client)
    for repository, layout in ((PARENT, parent), (f"{PARENT}/{child_name}", child)):
        log.reset()
        path, requests = EXPECTED[layout]
        assert routed_to(client.get(f"/v2/{repository}/manifests/latest")) == path, repository
        assert log.count == requests, (repository, log.entries)
        queries = [parse_qs(urlsplit(url).query) for _, url, _ in log.entries]
        assert [query["prefix"][0] for query in queries] == asked(layout, repository)
        assert all(query["delimiter"] == ["/"] and query["maxResults"] == ["1"] for query in queries)


@pytest.fixture
def scandirs(monkeypatch, tmp_path):
    """Directories ``os.scandir`` lists under ``tmp_path`` (the storage root), in order."""
    listed: list[str] = []
    original = os.scandir

    def scandir(path="."):
        if str(path).startswith(str(tmp_path)):
            listed.append(os.path.relpath(path, tmp_path))
        return original(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return listed


@pytest.mark.parametrize(("parent", "child", "child_name"), CASES)
def test_each_repository_is_routed_by_its_own_entries_on_the_filesystem(tmp_path, scandirs, parent, child,
                                                                        child_name):
    for name in objects_for(parent, child, child_name):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    config = {
        "regmw": {"plugins": ["migration"], "entry_points": False},
        "storage": {"root": str(tmp_path)},
        "migration": {"old_root": OLD_ROOT, "new_root": NEW_ROOT},
    }
    client = middleware(config, RecordingCachePlugin())
    for repository, layout in ((PARENT, parent), (f"{PARENT}/{child_name}", child)):
        scandirs.clear()
        path, _ = EXPECTED[layout]
        assert routed_to(client.get(f"/v2/{repository}/manifests/latest")) == path, repository
        # one scandir per prefix asked, of the repository's own directory
        assert scandirs == [prefix.rpartition("/")[0] for prefix in asked(layout, repository)], repository


def test_the_issue_reproduction_routes_new(tmp_path):
    """old/…/group/nest/child/_manifests and new/…/group/nest/_manifests: group/nest lives under new."""
    for name in ("old/repositories/group/nest/child/_manifests/tags/latest/current/link",
                 "new/repositories/group/nest/_manifests/tags/latest/current/link"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    config = {
        "regmw": {"plugins": ["migration"], "entry_points": False},
        "storage": {"root": str(tmp_path)},
        "migration": {"old_root": "old", "new_root": "new"},
    }
    client = middleware(config, RecordingCachePlugin())
    assert routed_to(client.get("/v2/group/nest/manifests/latest")) == "new"
    assert routed_to(client.get("/v2/group/nest/child/manifests/latest")) == "old"


def test_the_configuration_reference_states_the_own_entries_rule():
    """`old_root`'s meaning (configuration.md is generated from it) names the prefix the classifier asks."""
    from regmw_migration.classifier import own_entries
    from regmw_migration.settings import SECTION

    meaning = SECTION.options["old_root"].help
    assert f"`{own_entries('<old_root>', '<name>')}" in meaning
    assert "anything lies under" not in meaning


@pytest.mark.parametrize("backend", ["gcs", "filesystem"])
def test_a_repository_with_only_uploads_exists(gcs_emulator, tmp_path, backend):
    name = f"{OLD_ROOT}/repositories/{PARENT}/_uploads/u1/startedat"
    child = f"{NEW_ROOT}/repositories/{PARENT}/first/_uploads/u2/startedat"
    if backend == "gcs":
        gcs_emulator.put(name, child)
        config = {"regmw": {"plugins": ["gcs", "migration"], "entry_points": False}, "gcs": gcs_emulator.gcs_section()}
    else:
        for path in (name, child):
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_bytes(b"x")
        config = {"regmw": {"plugins": ["migration"], "entry_points": False}, "storage": {"root": str(tmp_path)}}
    config["migration"] = {"old_root": OLD_ROOT, "new_root": NEW_ROOT}
    client = middleware(config, RecordingCachePlugin())
    assert routed_to(client.get(f"/v2/{PARENT}/blobs/uploads/u1")) == "old"
    assert routed_to(client.get(f"/v2/{PARENT}/first/blobs/uploads/u2")) == "new"


# --- malformed answers from a fake GCS endpoint ----------------------------------------------------


def _json(value) -> tuple[int, str, bytes]:
    return 200, "application/json; charset=UTF-8", json.dumps(value).encode()


MALFORMED = {
    "issue-example": lambda p: _json({"items": {"name": p + "layers"}, "prefixes": "abc"}),
    "items-an-object": lambda p: _json({"items": {"a": 1}}),
    "items-null": lambda p: _json({"items": None}),
    "items-a-number": lambda p: _json({"items": 3}),
    "prefixes-a-string": lambda p: _json({"prefixes": "abc"}),
    "prefixes-a-number": lambda p: _json({"prefixes": 3}),
    "item-without-name": lambda p: _json({"items": [{}]}),
    "item-name-not-a-string": lambda p: _json({"items": [{"name": 7}]}),
    "item-not-an-object": lambda p: _json({"items": [p + "layers"]}),
    "item-outside-the-prefix": lambda p: _json({"items": [{"name": "elsewhere/_layers"}]}),
    "item-of-a-sibling": lambda p: _json({"items": [{"name": p[:-2] + "bar/_x"}]}),
    "item-deeper-than-the-delimiter": lambda p: _json({"items": [{"name": p + "layers/sha256/aa/link"}]}),
    "prefix-not-a-string": lambda p: _json({"prefixes": [7]}),
    "prefix-unhashable": lambda p: _json({"prefixes": [{"p": 1}]}),
    "prefix-outside-the-prefix": lambda p: _json({"prefixes": ["elsewhere/_layers/"]}),
    "prefix-of-a-sibling": lambda p: _json({"prefixes": [p[:-2] + "bar/_layers/"]}),
    "prefix-of-a-child": lambda p: _json({"prefixes": [p[:-1] + "child/"]}),
    "prefix-without-delimiter": lambda p: _json({"prefixes": [p + "layers"]}),
    "prefix-two-levels-down": lambda p: _json({"prefixes": [p + "layers/sha256/"]}),
    "prefix-is-the-request": lambda p: _json({"prefixes": [p]}),
    "token-not-a-string": lambda p: _json({"nextPageToken": 5}),
    "token-empty": lambda p: _json({"nextPageToken": ""}),
    "token-null": lambda p: _json({"nextPageToken": None}),
    "top-level-list": lambda p: _json([{"name": p + "layers"}]),
    "top-level-string": lambda p: _json("exists"),
    "top-level-null": lambda p: _json(None),
    "empty-body": lambda p: (200, "application/json", b""),
    "html": lambda p: (200, "text/html", b"<html><body>captive portal</body></html>"),
    "truncated": lambda p: (200, "application/json", b'{"prefixes": ["' + p.encode()),
}


def fake_config(fake, **migration) -> dict:
    return {
        "regmw": {"plugins": ["gcs", "migration"], "entry_points": False},
        "gcs": {"bucket": "registry", "endpoint": fake.endpoint, "anonymous": True, "project": "regmw-test",
                "timeout": 5.0, "retry_deadline": 0},
        "migration": {"old_root": OLD_ROOT, "new_root": NEW_ROOT, "retry_after": 11, **migration},
    }


@pytest.mark.parametrize("shape", list(MALFORMED))
def test_a_malformed_list_answer_is_503_and_nothing_is_cached(fake_gcs, shape):
    cache = RecordingCachePlugin()
    client = middleware(fake_config(fake_gcs), cache)
    fake_gcs.answer = MALFORMED[shape]
    assert_unavailable(client.get(f"/v2/{PARENT}/manifests/latest"), "11", PARENT)
    assert len(fake_gcs.requests) == 1  # one request, no retry, no guess
    assert fake_gcs.requests[0]["prefix"] == [own_entries(OLD_ROOT, PARENT)]
    assert cache.cache.sets == [] and cache.cache.adds == []

    # Nothing was cached: the next request asks storage again, and a well-formed answer routes it.
    fake_gcs.answer = lambda p: _json({"prefixes": [p + "layers/"], "nextPageToken": "more"})
    assert routed_to(client.get(f"/v2/{PARENT}/manifests/latest")) == "old"
    assert len(fake_gcs.requests) == 2
    assert [value for _, value, _ in cache.cache.adds] == [b"old"]


def test_a_well_formed_answer_with_extra_members_is_read(fake_gcs):
    """Strict about what the API promises, not about what it may add."""
    client = middleware(fake_config(fake_gcs), RecordingCachePlugin())
    fake_gcs.answer = lambda p: _json({"kind": "storage#objects", "future": {"x": 1},
                                       "items": [{"name": p + "file", "size": "3"}]})
    assert routed_to(client.get(f"/v2/{PARENT}/manifests/latest")) == "old"
    fake_gcs.answer = lambda p: _json({"kind": "storage#objects"})
    assert routed_to(client.get("/v2/nest/other/manifests/latest")) == "old"  # absent everywhere
    assert len(fake_gcs.requests) == 3


# --- GCS's name order, which the emulator does not reproduce --------------------------------------


def one_entry_pages(names: list[str]):
    """Answers as GCS does for ``delimiter=/``, ``maxResults=1``: the first entry in name order, and a token."""
    def answer(prefix: str) -> tuple[int, str, bytes]:
        entries = sorted({prefix + rest.split("/")[0] + ("/" if "/" in rest else "")
                          for name in names if name.startswith(prefix) for rest in [name[len(prefix):]]})
        body: dict = {}
        if entries:
            first = entries[0]
            body["prefixes" if first.endswith("/") else "items"] = [first if first.endswith("/") else {"name": first}]
            if len(entries) > 1:
                body["nextPageToken"] = "more"
        return _json(body)
    return answer


def test_a_child_that_sorts_before_the_own_entries_is_never_seen(fake_gcs):
    """On GCS a one-item list of ``nest/app/`` shows ``0builder/`` (``0`` < ``_``), never ``_layers/``.

    With ``_`` in the prefix the child is not in the answer at all, so the
    parent (under new) and the child (under old) are each routed by their own
    entries, one request per prefix asked.
    """
    names = [*repo_objects(OLD_ROOT, f"{PARENT}/0builder"), *repo_objects(NEW_ROOT, PARENT)]
    fake_gcs.answer = one_entry_pages(names)
    parent_folder = json.loads(fake_gcs.answer(f"{OLD_ROOT}/repositories/{PARENT}/")[2])
    assert parent_folder["prefixes"] == [f"{OLD_ROOT}/repositories/{PARENT}/0builder/"]  # the trap, as GCS sets it

    client = middleware(fake_config(fake_gcs), RecordingCachePlugin())
    assert routed_to(client.get(f"/v2/{PARENT}/manifests/latest")) == "new"
    assert [query["prefix"][0] for query in fake_gcs.requests] == asked("new", PARENT)
    fake_gcs.requests.clear()
    assert routed_to(client.get(f"/v2/{PARENT}/0builder/manifests/latest")) == "old"
    assert [query["prefix"][0] for query in fake_gcs.requests] == asked("old", f"{PARENT}/0builder")
