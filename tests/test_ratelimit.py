"""The embedded rate limiter: exact under threads, O(1) per hit, memory bounded by its cap."""
import threading
import tracemalloc

import pytest

from regmw.errors import ConfigError
from regmw.defaults.core import refused_by_limit
from regmw.defaults.ratelimit import COUNTER_OVERHEAD, LimitsRateLimiter, MemoryRateLimiter, parse_rules
from regmw.runtime import build

from .servers._util import in_fresh_interpreter, rss


class Ctx:
    """The three things a rule reads from a request context."""

    __slots__ = ("client", "is_write", "repository", "subject")

    def __init__(self, client="10.0.0.1", repository="group/project", is_write=False):
        self.client, self.repository, self.is_write, self.subject = client, repository, is_write, None


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def limiter(*tables, strategy="fixed-window", max_bytes=1 << 20, clock=None):
    return MemoryRateLimiter(parse_rules(list(tables)), strategy, max_bytes, clock or Clock())


def test_fixed_window_counts_refuses_and_resets():
    clock = Clock()
    lim = limiter({"by": "client", "limit": "3/minute", "name": "per-client"}, clock=clock)
    results = [lim.hit(Ctx()) for _ in range(4)]
    assert [r.allowed for r in results] == [True, True, True, False]
    assert [r.remaining for r in results[:3]] == [2, 1, 0]
    assert results[3].rule == "per-client" and results[3].limit == 3 and results[3].reset_after == 60
    assert lim.hit(Ctx(client="10.0.0.2")).allowed  # another identity has its own counter
    clock.now += 30
    assert not lim.hit(Ctx()).allowed and lim.hit(Ctx()).reset_after == 30
    clock.now += 30  # the window opened at the first hit has ended
    assert lim.hit(Ctx()).allowed


@pytest.mark.parametrize("strategy", ["fixed-window", "sliding-window-counter"])
def test_a_client_waiting_retry_after_seconds_is_admitted(strategy):
    """Retry-After and RateLimit-Reset round up: 1.0005 s left is 2, not 1 (a retry after 1 s was refused again)."""
    clock = Clock()
    lim = limiter({"by": "client", "limit": "1/minute", "name": "c"}, strategy=strategy, clock=clock)
    assert lim.hit(Ctx()).allowed
    clock.now += 58.9995  # 1.0005 s of the window left
    refused = lim.hit(Ctx())
    assert not refused.allowed
    answer = refused_by_limit(refused)
    retry_after = int(dict(answer.headers)["Retry-After"])
    assert retry_after == 2 and dict(refused.headers())["RateLimit-Reset"] == "2"
    clock.now += retry_after
    assert lim.hit(Ctx()).allowed  # a client that waited as told is admitted


def test_float_noise_in_the_window_end_is_not_a_second_more_to_wait():
    """At this clock, the window end ``(now + 60) - now`` is 60.000000000000114: Retry-After is still 60."""
    clock = Clock(1000.3000000000001)
    assert (clock.now + 60) - clock.now > 60
    refused = limiter({"by": "client", "limit": "0/minute", "name": "c"}, clock=clock).hit(Ctx())
    assert not refused.allowed and dict(refused_by_limit(refused).headers)["Retry-After"] == "60"
    assert dict(refused.headers())["RateLimit-Reset"] == "60"


def test_the_tightest_limit_is_reported_and_a_refusal_stops_the_counting():
    clock = Clock()
    lim = limiter({"by": "client", "limit": "10/minute", "name": "c"},
                  {"by": "repository", "limit": "2/minute;100/hour", "name": "r"}, clock=clock)
    first = lim.hit(Ctx())
    assert (first.rule, first.limit, first.remaining) == ("r", 2, 1)
    lim.hit(Ctx())
    refused = lim.hit(Ctx())
    assert not refused.allowed and refused.rule == "r" and refused.limit == 2
    assert lim.hit(Ctx(repository="other/repo")).remaining == 1  # c counted 4, r per repository is fresh
    # the hourly limit was not counted for the refused hit (counting stops at the first refusal)
    assert lim._book.data[(2, "group/project")][1] == 2


def test_methods_restrict_a_rule_and_unmatched_requests_are_unlimited():
    lim = limiter({"by": "repository", "limit": "1/minute", "methods": "write"})
    assert all(lim.hit(Ctx()).allowed for _ in range(5))  # reads do not count
    assert lim.hit(Ctx(is_write=True)).allowed
    assert not lim.hit(Ctx(is_write=True)).allowed


def test_sliding_window_counter_weights_the_previous_window():
    clock = Clock(now=600.0)  # the start of a one-minute window
    lim = limiter({"by": "client", "limit": "10/minute"}, strategy="sliding-window-counter", clock=clock)
    assert sum(lim.hit(Ctx()).allowed for _ in range(12)) == 10  # refused hits are not counted
    clock.now = 660.0 + 15  # a quarter into the next window: the previous one weighs 3/4 (7.5 -> 7)
    assert sum(lim.hit(Ctx()).allowed for _ in range(10)) == 3
    clock.now = 660.0 + 45  # the previous window weighs 1/4 (2.5), 3 hits in this one: 5 -> 5 more
    assert sum(lim.hit(Ctx()).allowed for _ in range(10)) == 5
    clock.now = 900.0  # two windows later: nothing weighs
    assert sum(lim.hit(Ctx()).allowed for _ in range(12)) == 10


def test_sliding_windows_open_at_a_keys_first_hit_as_in_redis():
    # limits' Redis storage (the redis plugin, hot_path = "limits") starts a key's window at its first hit
    # and shifts it every period from there; windows aligned on the clock admitted what Redis refuses.
    clock = Clock(now=630.0)  # half-way through a clock-aligned minute
    lim = limiter({"by": "client", "limit": "10/minute"}, strategy="sliding-window-counter", clock=clock)
    assert sum(lim.hit(Ctx()).allowed for _ in range(12)) == 10
    clock.now = 662.0  # 32 s after the first hit: still its first window (clock-aligned, a new one at 660)
    assert sum(lim.hit(Ctx()).allowed for _ in range(3)) == 0
    clock.now = 690.0 + 15  # a quarter into the second window: the first weighs 3/4 (7.5 -> 7)
    assert sum(lim.hit(Ctx()).allowed for _ in range(10)) == 3
    clock.now = 705.0 + 120  # both windows over: a fresh start at this hit
    assert sum(lim.hit(Ctx()).allowed for _ in range(12)) == 10
    clock.now = 825.0 + 59  # 59 s after that hit: still its first window
    assert not lim.hit(Ctx()).allowed


@pytest.mark.parametrize("strategy", ["fixed-window", "sliding-window-counter"])
def test_threads_never_admit_more_than_the_limit(strategy):
    lim = MemoryRateLimiter(parse_rules([{"by": "client", "limit": "500/hour"},
                                         {"by": "repository", "limit": "100000/hour"}]), strategy)
    admitted = []
    start = threading.Barrier(8)

    def worker():
        start.wait()
        admitted.append(sum(lim.hit(Ctx(repository=f"r/{n % 7}")).allowed for n in range(200)))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(admitted) == 500


def test_the_least_recently_used_counters_are_evicted_first():
    cap = 40 * (COUNTER_OVERHEAD + 16)
    lim = limiter({"by": "repository", "limit": "5/hour"}, max_bytes=cap)
    for _ in range(5):
        lim.hit(Ctx(repository="hot/repo"))
    for index in range(1000):
        lim.hit(Ctx(repository=f"cold/{index:010d}"))
        if index % 10 == 0:
            assert not lim.hit(Ctx(repository="hot/repo")).allowed  # kept: it is used all the time
        assert lim.size_bytes <= cap
    assert 0 < lim.counters <= 40
    assert (0, "cold/0000000000") not in lim._book.data  # the coldest went first: it starts again from zero
    assert lim.hit(Ctx(repository="cold/0000000000")).remaining == 4


def million_keys_run() -> dict:
    """1M repositories and 100k clients through a limiter capped at 2 MiB (run in a fresh interpreter)."""
    cap = 2 * 1024 * 1024
    lim = MemoryRateLimiter(parse_rules([{"by": "client", "limit": "100/second"},
                                         {"by": "repository", "limit": "100/second"}]), max_bytes=cap)
    context = Ctx()

    def drive(start, count):
        for index in range(start, start + count):
            context.client = f"10.{index % 100_000 // 65536}.{index % 65536 // 256}.{index % 256}"
            context.repository = f"group{index % 977}/project-{index}"
            assert lim.hit(context).allowed

    rss_before = rss()
    over_cap = False
    for start in range(0, 1_000_000, 100_000):
        drive(start, 100_000)
        over_cap = over_cap or lim.size_bytes > cap
    rss_grown, counters = rss() - rss_before, lim.counters

    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        drive(2_000_000, 3 * lim.counters)
        held = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    old_left = any(index < 2_000_000 for index in (int(key[1].rsplit("-", 1)[1]) for key in lim._book.data
                                                   if key[0] == 1))
    return {"cap": cap, "over_cap": over_cap, "rss_grown": rss_grown, "counters": counters, "held": held,
            "size_bytes": lim.size_bytes, "old_left": old_left}


def test_a_million_repositories_and_100k_clients_stay_under_the_cap():
    """1,000,000 distinct repositories and 100,000 clients: held memory stays under the cap.

    The whole run is checked on the limiter's books and on the process's RSS
    (unbounded, the same run holds over 300 MiB); then, with tracemalloc on,
    fresh keys replace every resident counter, so every block the table holds
    (counters, keys, identities, links, hash table) was allocated under the
    tracer, and what it counts must stay under the cap too.
    """
    result = in_fresh_interpreter(million_keys_run)
    cap = result["cap"]
    assert not result["over_cap"]
    assert result["rss_grown"] <= cap + 8 * 1024 * 1024
    assert 4_000 < result["counters"] < 7_000
    assert not result["old_left"]  # every resident counter was replaced by the fresh keys
    assert result["held"] <= result["size_bytes"] <= cap, result


def test_moving_window_is_refused_at_start_up_in_one_line():
    config = {"regmw": {"plugins": [], "entry_points": False},
              "ratelimit": {"strategy": "moving-window", "rules": [{"by": "client", "limit": "1/second"}]}}
    with pytest.raises(ConfigError) as raised:
        build(config, environ={})
    message = str(raised.value)
    assert "\n" not in message and "moving-window" in message and "embedded rate limiter" in message


def test_the_embedded_default_is_the_bounded_limiter_and_declares_its_rules():
    config = {"regmw": {"plugins": [], "entry_points": False},
              "ratelimit": {"max_bytes": 65536, "rules": [{"by": "repository", "limit": "5/minute", "name": "r"}]}}
    limiter_ = build(config, environ={}).services.rate_limiter
    assert isinstance(limiter_, MemoryRateLimiter) and limiter_.max_bytes == 65536
    assert limiter_.declarative is True and [rule.name for rule in limiter_.rules] == ["r"]
    assert LimitsRateLimiter.declarative is True
