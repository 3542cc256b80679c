"""The GCS plugin against the in-process GCS emulator, counting real HTTP requests."""
from __future__ import annotations

import json
import os
import socket
import threading
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from regmw_gcs import GCSStorage, naive_stat
from regmw_gcs.client import NO_BACKGROUND_FETCHES, make_retry
from regmw_gcs.listing import ListPage, MalformedAnswer, read_page

import regmw
from regmw.errors import ConfigError, StorageError
from tests.servers._util import wait_until
from tests.servers.gcs_emulator import count_requests

REPOS = "docker/registry/v2/repositories"


def storage_for(emulator, **extra) -> GCSStorage:
    runtime = regmw.build({"regmw": {"plugins": ["gcs"]}, "gcs": emulator.gcs_section(**extra)}, environ={})
    storage = runtime.services.storage
    assert isinstance(storage, GCSStorage)
    return storage


@pytest.fixture
def seeded(gcs_emulator):
    gcs_emulator.put(
        f"{REPOS}/direct/file",                                  # an object right under the repository
        f"{REPOS}/group/deep/_layers/sha256/aa/link",            # only sub-prefixes
        f"{REPOS}/group/deep/_manifests/revisions/sha256/bb/link",
        f"{REPOS}/foobar/_layers/sha256/cc/link",                # foobar exists, foo does not
        f"{REPOS}/other/_uploads/u1/startedat",
    )
    storage = storage_for(gcs_emulator)
    log = count_requests(storage.client)
    return storage, log


def query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("direct", True), ("group/deep", True), ("missing", False), ("foo", False), ("foobar", True), ("group", True)],
    ids=["existing", "sub-prefix-only", "missing", "foo-not-foobar", "foobar", "parent-of-repo"],
)
def test_prefix_check_is_one_request(seeded, name, expected):
    storage, log = seeded
    assert storage.prefix_exists(f"{REPOS}/{name}/") is expected
    assert log.count == 1
    method, url, size = log.entries[0]
    params = query(url)
    assert method == "GET"
    assert urlsplit(url).path.endswith(f"/b/{storage.bucket_name}/o")
    assert params["prefix"] == [f"{REPOS}/{name}/"]
    assert params["delimiter"] == ["/"]
    assert params["maxResults"] == ["1"]
    assert params["fields"] == ["items(name),prefixes,nextPageToken"]
    if name != "direct":  # the emulator ignores `fields`, so a direct object comes with full metadata
        assert size < 300  # a small answer, whatever the repository holds below


def _thread_starts(monkeypatch) -> list[str]:
    """Names of the threads started from now on (google-cloud-storage names its fetch threads by target)."""
    names: list[str] = []
    original = threading.Thread.start

    def start(thread):
        names.append(thread.name)
        return original(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    return names


def test_client_makes_no_background_requests(seeded, gcs_emulator, monkeypatch):
    """google-cloud-storage 3.x fetches bucket metadata in background threads; the library's switch stops it.

    First the behaviour relied on, on the installed version: without the
    switch, a plain client's first list starts a ``_fetch_background`` thread
    that sends a ``buckets.get``. Then the plugin's client: no thread, and
    exactly the requests the checks make.
    """
    monkeypatch.delenv(NO_BACKGROUND_FETCHES, raising=False)
    started = _thread_starts(monkeypatch)
    plain = gcs_emulator.make_client(quiet=False)
    plain_log = count_requests(plain)
    list(plain.list_blobs(gcs_emulator.bucket, prefix=f"{REPOS}/direct/", retry=None))
    assert any("_fetch_background" in name for name in started), started
    wait_until(lambda: any(urlsplit(url).path.endswith(f"/b/{gcs_emulator.bucket}") for _, url, _ in plain_log.entries),
               what="the background buckets.get")

    storage, log = seeded
    storage = storage_for(gcs_emulator)  # built with the variable unset: the plugin sets it
    log = count_requests(storage.client)
    assert os.environ[NO_BACKGROUND_FETCHES] == "true"
    started.clear()
    for _ in range(3):
        storage.stat(f"{REPOS}/absent/object")  # a 404, then a list
        storage.prefix_exists(f"{REPOS}/absent/_")
    assert [name for name in started if "background" in name] == []  # the library's fetch/verify threads
    assert log.count == 9


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [("foo", True), ("foo/", False), ("foo/_", False), ("group/_", False), ("group/deep/_", True),
     ("other/_", True), ("direct/_", False), ("group/", True)],
    ids=["plain-prefix-matches-foobar", "directory-foo", "own-entries-of-foo", "parent-has-only-a-child",
         "own-entries", "only-uploads", "object-not-an-own-entry", "directory-of-a-child"],
)
def test_a_prefix_is_a_plain_prefix(seeded, prefix, expected):
    """``prefix_exists`` reads its argument as GCS does; the classifier's ``<name>/_`` finds own entries only."""
    storage, log = seeded
    assert storage.prefix_exists(f"{REPOS}/{prefix}") is expected
    assert log.count == 1
    params = query(log.entries[0][1])
    assert params["prefix"] == [f"{REPOS}/{prefix}"]
    assert params["delimiter"] == ["/"] and params["maxResults"] == ["1"]


def test_root_prefixes_every_key(gcs_emulator):
    gcs_emulator.put(f"reg/root/{REPOS}/inside/_layers/x")
    storage = storage_for(gcs_emulator, root="/reg/root/")
    assert storage.root == "reg/root"
    assert storage.prefix_exists(f"{REPOS}/inside/") is True
    assert storage_for(gcs_emulator).prefix_exists(f"{REPOS}/inside/") is False


def test_a_prefix_only_first_page_is_read_once(seeded):
    """Real GCS answers maxResults=1 with one prefix AND a nextPageToken (0 items).

    The emulator never paginates, so the token is added to its real answer here.
    google-cloud-storage's item iterator would then fetch a second page; the
    plugin must read exactly one.
    """
    storage, log = seeded
    http = storage.client._http
    counted = http.request

    def with_page_token(method, url, *args, **kwargs):
        response = counted(method, url, *args, **kwargs)
        if "delimiter" in url and "pageToken" not in url:
            body = json.loads(response.content)
            body["nextPageToken"] = "more"
            response._content = json.dumps(body).encode()
        return response

    http.request = with_page_token
    assert storage.prefix_exists(f"{REPOS}/group/deep/") is True
    assert log.count == 1

    # The naive way to read the same iterator makes a second request: the trap is real.
    log.reset()
    iterator = storage.client.list_blobs(
        storage.bucket_name, prefix=f"{REPOS}/group/deep/", delimiter="/", max_results=1, retry=None
    )
    list(iterator)
    assert log.count == 2


def _empty_pages_first(storage, empty_pages: int) -> list[str]:
    """Answer the first ``empty_pages`` listings with no items, no prefixes and a nextPageToken.

    Real GCS may return fewer than maxResults entries, even none, with a
    continuation token. The emulator never paginates, so this one response body
    is faked (only what the emulator cannot do); every request still goes to
    the emulator and is counted, and later pages are its real answers.
    """
    http = storage.client._http
    counted = http.request
    urls: list[str] = []

    def empty_with_token(method, url, *args, **kwargs):
        response = counted(method, url, *args, **kwargs)
        if "delimiter" in url:
            urls.append(url)
            if len(urls) <= empty_pages:
                response._content = json.dumps({"kind": "storage#objects", "nextPageToken": f"t{len(urls)}"}).encode()
        return response

    http.request = empty_with_token
    return urls


@pytest.mark.parametrize(("name", "expected"), [("group/deep", True), ("direct", True), ("missing", False)])
def test_an_empty_page_with_a_token_is_followed_not_absent(seeded, name, expected):
    storage, log = seeded
    urls = _empty_pages_first(storage, 1)
    assert storage.prefix_exists(f"{REPOS}/{name}/") is expected
    assert log.count == 2
    assert "pageToken" not in query(urls[0]) and query(urls[1])["pageToken"] == ["t1"]
    assert query(urls[1])["maxResults"] == ["1"] and query(urls[1])["prefix"] == [f"{REPOS}/{name}/"]


def test_empty_pages_with_tokens_are_followed_a_bounded_number_of_times(seeded):
    storage, log = seeded
    _empty_pages_first(storage, 3)
    assert storage.prefix_exists(f"{REPOS}/group/deep/") is True  # the 4th page holds the answer
    assert log.count == 4

    log.reset()
    _empty_pages_first(storage, 100)
    with pytest.raises(StorageError, match="empty pages"):
        storage.prefix_exists(f"{REPOS}/group/deep/")  # never "absent" on a guess
    assert log.count == 4
    log.reset()
    with pytest.raises(StorageError, match="empty pages"):
        storage.stat(f"{REPOS}/group/deep")
    assert log.count == 5  # the metadata GET, then the bounded listing


def test_stat_file_directory_and_missing(seeded):
    storage, log = seeded
    result = storage.stat(f"{REPOS}/direct/file")
    assert result is not None and not result.is_dir and result.size == 1 and result.modified
    assert log.count == 1  # the metadata GET found it

    log.reset()
    result = storage.stat(f"{REPOS}/group/deep")
    assert result is not None and result.is_dir
    assert log.count == 2
    get, listing = log.entries
    assert "/o/" in urlsplit(get[1]).path
    params = query(listing[1])
    assert params["prefix"] == [f"{REPOS}/group/deep/"]
    assert params["delimiter"] == ["/"] and params["maxResults"] == ["1"]
    assert params["fields"] == ["items(name),prefixes,nextPageToken"]

    log.reset()
    assert storage.stat(f"{REPOS}/nothing/here") is None
    assert log.count == 2


def test_naive_stat_lists_everything_with_full_metadata(seeded, gcs_emulator):
    storage, log = seeded
    gcs_emulator.put(*(f"{REPOS}/big/_layers/sha256/{i:04d}/link" for i in range(30)))
    log.reset()
    assert naive_stat(storage, f"{REPOS}/big") is True
    assert log.count == 2
    params = query(log.entries[1][1])
    assert "delimiter" not in params and "fields" not in params and params["projection"] == ["full"]
    naive_bytes = log.bytes

    log.reset()
    assert storage.prefix_exists(f"{REPOS}/big/")
    assert log.bytes * 20 < naive_bytes


def test_missing_bucket_is_an_error_not_absent(gcs_emulator):
    storage = storage_for(gcs_emulator, bucket="no-such-bucket")
    with pytest.raises(StorageError, match="no-such-bucket"):
        storage.prefix_exists(f"{REPOS}/x/")
    with pytest.raises(StorageError):
        storage.stat(f"{REPOS}/x")


def test_stopped_emulator_is_an_error(own_gcs_emulator):
    storage = storage_for(own_gcs_emulator)
    assert storage.prefix_exists(f"{REPOS}/x/") is False
    own_gcs_emulator.stop()
    with pytest.raises(StorageError):
        storage.prefix_exists(f"{REPOS}/x/")
    with pytest.raises(StorageError):
        storage.stat(f"{REPOS}/x")


def test_unanswered_request_times_out_as_an_error(gcs_emulator):
    """A server that accepts and never answers: the configured timeout ends the wait."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        storage = storage_for(gcs_emulator, endpoint=f"http://127.0.0.1:{port}", timeout=0.2)
        with pytest.raises(StorageError, match="Timeout"):
            storage.prefix_exists(f"{REPOS}/x/")


def fail_requests(storage, count: int) -> list[str]:
    """Make the storage client's next ``count`` HTTP requests fail with a connection reset; return their URLs."""
    http = storage.client._http
    counted = http.request
    failures: list[str] = []

    def flaky(method, url, *args, **kwargs):
        if len(failures) < count:
            failures.append(url)
            raise requests.ConnectionError("connection reset (injected)")
        return counted(method, url, *args, **kwargs)

    http.request = flaky
    return failures


def test_transient_errors_are_retried(seeded):
    storage, _ = seeded
    storage = GCSStorage(storage.client, storage.bucket_name, timeout=5.0,
                         retry=make_retry({"retry_deadline": 5.0, "retry_initial": 0.001,
                                           "retry_maximum": 0.001, "retry_multiplier": 1.0}))
    failures = fail_requests(storage, 2)
    assert storage.prefix_exists(f"{REPOS}/direct/") is True
    assert len(failures) == 2


def test_retry_settings_shape_the_backoff(seeded, monkeypatch):
    """The [gcs] retry options reach google.api_core's backoff (read from its sleeps, not its private fields)."""
    from google.api_core.retry import retry_unary

    assert make_retry({"retry_deadline": 0}) is None
    retry = make_retry({"retry_deadline": 3.0, "retry_initial": 0.001, "retry_maximum": 0.002,
                        "retry_multiplier": 2.0})
    assert retry.timeout == 3.0
    sleeps: list[float] = []
    monkeypatch.setattr(retry_unary.time, "sleep", sleeps.append)  # record the delays instead of waiting
    storage, _ = seeded
    storage = GCSStorage(storage.client, storage.bucket_name, timeout=5.0, retry=retry)
    fail_requests(storage, 6)
    assert storage.prefix_exists(f"{REPOS}/direct/") is True
    assert len(sleeps) == 6
    assert sleeps[0] <= 0.001 and all(delay <= 0.002 for delay in sleeps)  # defaults: up to 1 s, then 2 s, ...


def test_config_requires_a_bucket():
    with pytest.raises(ConfigError, match="gcs.bucket"):
        regmw.build({"regmw": {"plugins": ["gcs"]}}, environ={})
    with pytest.raises(ConfigError, match="gcs.root"):
        regmw.build({"regmw": {"plugins": ["gcs"]}, "gcs": {"bucket": "b", "root": "a//b"}}, environ={})


@pytest.mark.parametrize(
    ("answer", "found", "token"),
    [
        ({}, False, None),
        ({"kind": "storage#objects", "nextPageToken": "t"}, False, "t"),
        ({"prefixes": ["r/app/_layers/"]}, True, None),
        ({"prefixes": ["r/app/_/"]}, True, None),                      # an empty segment is still one level
        ({"items": [{"name": "r/app/_"}]}, True, None),                 # an object named exactly the prefix
        ({"items": [{"name": "r/app/_x", "size": "1"}], "prefixes": [], "extra": 1}, True, None),
    ],
)
def test_well_formed_list_answers(answer, found, token):
    assert read_page(answer, "r/app/_") == ListPage(found, token)


@pytest.mark.parametrize("answer", [
    {"items": [{"name": "r/app/_x/y"}]}, {"prefixes": ["r/app/_"]}, {"prefixes": ["r/app/"]},
    {"prefixes": ["r/apple/_x/"]}, {"items": [{"name": "r/ap"}]}, {"items": [], "nextPageToken": None, "prefixes": 0},
])
def test_list_answers_outside_the_promise(answer):
    with pytest.raises(MalformedAnswer):
        read_page(answer, "r/app/_")
