"""Per-request classification: cache (or the admission's prefetch), then storage, then the decision.

Cached facts, under ``repository_key(<name>, "migration")``:

* ``b"old"``: the repository has its own entries under the old root
  (:func:`own_entries`: its children do not count). Expires after
  ``old_ttl`` (repositories get migrated) and is overwritten by
  :meth:`Classifier.mark_migrated`. Written only if the key is absent
  (``Cache.add``, SET NX), so a look-up still in flight when the repository
  is migrated cannot put "old" back over the fresh "new" mark.
* ``b"new"``: none of its own entries under the old root and some under the new one,
  or the repository was marked migrated. Permanent by default: a new
  repository never goes back.

Absence is never cached: a repository that does not exist yet is about to be
created under one prefix or the other, and a stale "absent" would misroute it.
Concurrent look-ups of one repository share one storage request (see
:mod:`.singleflight`). When storage cannot answer, the request is refused with
503 UNAVAILABLE and Retry-After; it is never routed on a guess.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from regmw import metrics
from regmw.backends import Services, repository_key
from regmw.errors import BackendUnavailable, Refusal, unavailable

from .decision import (
    STATE_ABSENT, STATE_NEW, STATE_NOT_OLD, STATE_OLD, decide, needs_new_prefix, token_flag,
)
from .singleflight import SingleFlight

log = logging.getLogger("regmw.migration")

HEADER = "Regmw-Migration-Path"
CACHED = {b"old": STATE_OLD, b"new": STATE_NEW}
PERMANENT = 0  # Cache.set ttl 0: no expiry
#: a backend that is down fails every request the same way: its WARNING at most once a second
#: per backend (the rest at DEBUG), as for every backend error; each one is still counted
LOG_INTERVAL = 1.0


#: the first character of a repository's own entries in distribution's layout
#: (``_layers/``, ``_manifests/``, ``_uploads/``); no name component may start with it
OWN_ENTRY_MARK = "_"


def own_entries(root: str, repository: str) -> str:
    """The storage prefix of ``repository``'s own entries: ``<root>/repositories/<name>/_``.

    Repository names nest (``group/app`` and ``group/app/builder`` are two
    repositories), so "anything under ``<name>/``" would also find a child
    repository and route ``<name>`` by its child's layout. A repository is
    present when it has one of its own entries, and those are exactly the
    names under ``<name>/`` that start with ``_``: a name component must start
    with a letter or digit. One prefix, so still ONE list request (GCS) or
    one ``scandir`` (filesystem), and ``foo`` never matches ``foobar``.
    """
    return f"{root}/repositories/{repository}/{OWN_ENTRY_MARK}"


class Classifier:
    """Old/new classification for one configured runtime (``services.classifier``)."""

    def __init__(self, services: Services, section: Mapping[str, Any]) -> None:
        self.services = services
        self.cache = services.cache
        self.storage = services.storage
        self.old_root = section["old_root"]
        self.new_root = section["new_root"]
        self.paused = section["paused"]
        self.old_ttl = section["old_ttl"]
        self.new_ttl = section["new_ttl"] or PERMANENT
        self.retry_after = section["retry_after"]
        self.flights = SingleFlight(section["max_inflight"], section["wait_timeout"])

    # --- keys and prefixes ------------------------------------------------

    @staticmethod
    def cache_key(repository: str) -> str:
        return repository_key(repository, "migration")

    def prefetch_key(self, context: Any) -> str | None:
        """Declared through ``regmw_prefetch``: the key an admission should read on its round trip."""
        return self.cache_key(context.repository) if context.repository else None

    def old_prefix(self, repository: str) -> str:
        """Where ``repository``'s own entries would be under the old root (see :func:`own_entries`)."""
        return own_entries(self.old_root, repository)

    def new_prefix(self, repository: str) -> str:
        """Where ``repository``'s own entries would be under the new root (see :func:`own_entries`)."""
        return own_entries(self.new_root, repository)

    # --- the request path -------------------------------------------------

    def classify(self, context: Any) -> str:
        repository = context.repository
        key = self.cache_key(repository)
        state = CACHED.get(self._cached(context, key) or b"")
        source = "cache" if state else "storage"
        flag = None
        if state != STATE_OLD:
            flag = token_flag(context.token_claims, repository, needs_push=context.is_write)
            if state is None:
                state = self._lookup(repository, key, needs_new_prefix(flag, self.paused))
        path, reason = decide(state, flag, self.paused)
        if reason in ("old_prefix", "new_prefix"):
            reason = source
        metrics.classification(path, reason, source == "cache", context)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s: %s (decided by %s; state %s, token flag %s)",
                      context.method, repository, path, reason, state, flag)
        return path

    def _cached(self, context: Any, key: str) -> bytes | None:
        if key in context.prefetched:
            return context.prefetched[key]  # None: a known miss, do not ask again
        try:
            return self.cache.get(key)
        except Exception as exc:  # a cache is allowed to fail: a miss
            metrics.backend_errors.labels("cache", "miss").inc()
            metrics.warn_at_most_every(LOG_INTERVAL, "cache", log,
                                       "classification cache unavailable, asking storage: %s", exc)
            return None

    def _lookup(self, repository: str, key: str, need_new: bool) -> str:
        """The repository's state from storage, one coalesced request per prefix asked."""
        try:
            if self.flights.do(("old", repository), lambda: self._probe(key, self.old_prefix(repository), STATE_OLD)):
                return STATE_OLD
            if not need_new:
                return STATE_NOT_OLD
            if self.flights.do(("new", repository), lambda: self._probe(key, self.new_prefix(repository), STATE_NEW)):
                return STATE_NEW
            return STATE_ABSENT
        except Refusal:
            raise
        except Exception as exc:
            metrics.backend_errors.labels("storage", "unavailable").inc()
            metrics.warn_at_most_every(LOG_INTERVAL, "storage", log,
                                       "cannot classify %s, storage did not answer: %s", repository, exc)
            raise unavailable(
                "cannot classify the repository: storage is unavailable", self.retry_after, {"name": repository}
            ) from exc

    def _probe(self, key: str, prefix: str, state: str) -> bool:
        """One storage request (run by the flight's leader), caching a positive answer."""
        if self.storage is None:
            raise RuntimeError("no storage backend configured")
        found = self.storage.prefix_exists(prefix)
        if found:
            self._store(key, state)
        return found

    def _store(self, key: str, state: str) -> None:
        """Cache what storage said. "old" only if the key is absent (``Cache.add``).

        A look-up that saw the old prefix may finish after the repository was
        migrated and marked "new" (:meth:`mark_migrated`); written with ``set``,
        its stale "old" would replace the mark and route the repository old for
        ``old_ttl``. "new" is never stale (permanent), so it is ``set``.
        """
        try:
            if state == STATE_OLD:
                if not self.cache.add(key, state.encode(), self.old_ttl):
                    log.debug("not caching old for %s: the cache already holds an answer", key)
            else:
                self.cache.set(key, state.encode(), self.new_ttl)
        except Exception as exc:
            metrics.backend_errors.labels("cache", "not_cached").inc()
            metrics.warn_at_most_every(LOG_INTERVAL, "cache", log,
                                       "classification cache unavailable, not caching %s: %s", key, exc)

    # --- migration events -------------------------------------------------

    def mark_migrated(self, repository: str) -> None:
        """Record that ``repository`` now lives under the new prefix: cached "new", replacing "old"."""
        key = self.cache_key(repository)
        self.cache.set(key, STATE_NEW.encode(), self.new_ttl)
        if self.cache.get(key) != STATE_NEW.encode():  # a cache drops writes it cannot make
            raise BackendUnavailable(f"the cache did not keep the migration mark of {repository}")
        log.info("%s marked as migrated (new)", repository)

