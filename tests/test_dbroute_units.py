"""Pure logic of the dbroute plugin: WAL positions, lag, quarantine, the memory store, config checks."""
from __future__ import annotations

import threading

import pytest
from regmw_dbroute.config import settings_from_config
from regmw_dbroute.health import PrimaryHistory, ReplicaState
from regmw_dbroute.lsn import format_lsn, from_key, parse_lsn, to_key
from regmw_dbroute.store import MemoryPositionStore, Positions

from regmw.errors import ConfigError
from regmw.runtime import build


def test_lsn_round_trip_and_numeric_order():
    assert parse_lsn("16/B374D848") == 0x16B374D848
    assert format_lsn(0x16B374D848) == "16/B374D848"
    assert parse_lsn("10/0") > parse_lsn("9/FFFFFFFF")  # text order would say otherwise
    assert from_key(to_key(parse_lsn("FFFFFFFF/FFFFFFFF"))) == 2**64 - 1
    assert to_key(1) < to_key(0x100000000)  # fixed width: string order == numeric order
    with pytest.raises(ValueError):
        parse_lsn("1234")


def test_history_lag_is_time_since_primary_first_passed_the_replica():
    history = PrimaryHistory(window=100)
    history.add(10.0, 100)
    history.add(11.0, 100)  # same position later: the first time seen is kept
    history.add(12.0, 200)
    history.add(13.0, 300)
    assert history.lag(300, now=20.0) == 0.0  # caught up: no lag however idle the primary is
    assert history.lag(250, now=20.0) == pytest.approx(7.0)  # primary first at >250 at t=13
    assert history.lag(150, now=20.0) == pytest.approx(8.0)
    assert history.lag(50, now=20.0) == pytest.approx(10.0)
    assert PrimaryHistory(window=1).lag(5, now=1.0) is None


def test_history_window_is_bounded_but_keeps_the_latest():
    history = PrimaryHistory(window=5)
    for second in range(100):
        history.add(float(second), second * 10)
    assert history.latest == 990
    assert history.lag(0, now=99.0) >= 5  # older than the window: still reported as lagging


def make_state(**overrides) -> ReplicaState:
    values = {"name": "r1", "max_byte_lag": 1000, "max_replay_lag": 2.0, "failure_threshold": 3,
                  "reintegrate_after": 2, "staleness": 5.0}
    values.update(overrides)
    return ReplicaState(**values)


def test_replica_not_eligible_until_first_good_check_and_when_checks_go_stale():
    state = make_state()
    assert not state.eligible(0.0)
    state.record_check(100, 0, 0.0, when=1.0)
    assert state.eligible(1.0)
    assert not state.eligible(7.0)  # no good check for longer than the staleness window


def test_quarantine_on_lag_and_reintegration_after_good_checks():
    state = make_state()
    state.record_check(100, 0, 0.0, when=1.0)
    state.record_check(100, 5000, 0.1, when=2.0)
    assert state.quarantined and "byte lag" in state.reason
    state.record_check(200, 0, 0.0, when=3.0)
    assert state.quarantined  # one good check is not enough
    state.record_check(300, 0, 3.0, when=4.0)
    assert state.quarantined and "replay lag" in state.reason
    state.record_check(300, 0, 0.0, when=5.0)
    state.record_check(300, 0, 0.0, when=6.0)
    assert not state.quarantined and state.eligible(6.0)


def test_quarantine_after_consecutive_failures_only():
    state = make_state()
    state.record_check(100, 0, 0.0, when=1.0)
    state.record_failure("refused")
    state.record_failure("refused")
    assert not state.quarantined
    state.record_check(100, 0, 0.0, when=2.0)  # a success resets the count
    for _ in range(3):
        state.record_failure("refused")
    assert state.quarantined and "3 consecutive" in state.reason
    state.record_failure("promoted", immediate=True)
    assert state.quarantined


def test_replay_positions_only_move_with_newer_observations():
    state = make_state()
    state.observe_replay(500, when=2.0)
    state.observe_replay(400, when=1.0)  # an older observation arriving late
    assert state.replay_lsn == 500


def test_memory_store_keeps_the_maximum_under_concurrency():
    store = MemoryPositionStore()
    assert store.get("a") == Positions(None, None, False)

    def advance(base):
        for i in range(500):
            store.advance("a", base + i, 60)

    threads = [threading.Thread(target=advance, args=(base,)) for base in (0, 1000, 500)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.get("a").repository == 1499
    store.initialize(700, 60)
    positions = store.get("a")
    assert positions.initialized and positions.floor == 700 and positions.required == 1499
    assert store.get("b").required == 700


def test_memory_store_positions_expire():
    store = MemoryPositionStore()
    store.advance("a", 10, ttl=-1)  # already expired
    assert store.get("a").repository is None


def test_memory_store_holds_at_most_the_repositories_of_two_ttls(monkeypatch):
    """docs/database-routing.md (Memory): many distinct repositories, swept at most once per lsn_ttl."""
    from regmw_dbroute import store as store_module

    clock = {"now": 1000.0}
    monkeypatch.setattr(store_module.time, "monotonic", lambda: clock["now"])
    store, ttl = MemoryPositionStore(), 600.0
    for minute in range(60):  # a new repository name every second for an hour
        for second in range(60):
            clock["now"] = 1000.0 + minute * 60 + second
            store.advance(f"team-{minute}/{'x' * 200}-{second}", minute * 60 + second, ttl)
            assert len(store._positions) <= 2 * ttl + 1
    assert store.get(f"team-59/{'x' * 200}-59").repository == 3599  # the live ones are all kept
    assert store.get(f"team-50/{'x' * 200}-0").repository == 3000


BASE = {"primary": "postgresql://u@127.0.0.1:5432/db"}


def section(**overrides):
    runtime_values = {
        "primary": BASE["primary"], "replicas": [], "pool_size": 5, "max_overflow": 10,
        "pool_timeout": 5.0, "pool_recycle": 1800.0, "pre_ping": True, "connect_timeout": 2,
        "statement_timeout": 30.0, "health_interval": 1.0, "max_byte_lag": 1, "max_replay_lag": 30.0,
        "failure_threshold": 3, "reintegrate_after": 2, "replay_position_max_age": 0.05, "lsn_ttl": 600.0,
        "store": "memory", "store_url": "", "store_namespace": "", "store_timeout": 0.25, "store_retry": 1.0,
    }
    runtime_values.update(overrides)
    return runtime_values


def test_lsn_ttl_must_outlive_the_quarantine_window():
    config = {"regmw": {"plugins": ["dbroute"], "entry_points": False}, "database": {**BASE, "lsn_ttl": 30.0}}
    with pytest.raises(ConfigError, match="lsn_ttl: must exceed"):
        validate_only(config)


def validate_only(raw):
    from regmw.config import validate
    from regmw.plugins import load_plugins, make_manager
    from regmw.runtime import gather_sections

    pm = make_manager()
    load_plugins(pm, raw["regmw"]["plugins"], entry_points=False)
    return validate(raw, gather_sections(pm))


def test_settings_are_the_sections_options_declared_once():
    from regmw_dbroute.config import SECTION

    settings = settings_from_config(section())
    assert {key: getattr(settings, key) for key in SECTION.options} == {**section(), "replicas": ()}
    assert settings.health_staleness == 3 * 1.0 + 2
    with pytest.raises(AttributeError, match="no option 'discovery'"):
        settings.discovery  # noqa: B018
    with pytest.raises(TypeError, match="lack store_retry"):
        settings_from_config({key: value for key, value in section().items() if key != "store_retry"})
    with pytest.raises(AttributeError):
        settings.lsn_ttl = 1


@pytest.mark.parametrize("database, message", [
    ({}, "database.primary"),
    ({**BASE, "replicas": ["mysql://x@h/db"]}, "database.replicas"),
    ({**BASE, "store": "etcd"}, "database.store"),
    ({**BASE, "max_replay_lag": -1}, "database.max_replay_lag"),
    ({**BASE, "store_namespace": "team{a}"}, "database.store_namespace"),
])
def test_bad_database_section_is_refused_at_start_up(database, message):
    with pytest.raises(ConfigError, match=message):
        build({"regmw": {"plugins": ["dbroute"], "entry_points": False}, "database": database}, environ={})


def test_every_option_is_documented():
    from regmw_dbroute.config import SECTION

    for key, option in SECTION.options.items():
        assert len(option.help) > 20, key


def test_flush_keeps_a_newer_pending_position_added_while_flushing():
    """flush_pending drops only the entry it stored, never one a concurrent write added meanwhile."""
    from regmw_dbroute.router import Router

    class StoreWithAWriteDuringAdvance(MemoryPositionStore):
        def advance(self, repository, lsn, ttl):
            kept = super().advance(repository, lsn, ttl)
            if self.during_advance is not None:
                hook, self.during_advance = self.during_advance, None
                hook()  # another request's write of the same repository fails to reach the store
            return kept

    store = StoreWithAWriteDuringAdvance()
    router = Router(settings_from_config(section()), store)
    try:
        router._add_pending("a/b", 100)
        store.during_advance = lambda: router._add_pending("a/b", 200)
        assert router.flush_pending() == 1  # 100 stored; 200 is still only known here
        assert store.get("a/b").repository == 100
        assert router._pending["a/b"][0] == 200
        assert router.flush_pending() == 0
        assert store.get("a/b").repository == 200
    finally:
        router.close()
