"""The migration decision, as a pure function of what storage and the token say.

::

    exists under OLD prefix?  ── yes ──► old
       no
    known new (cached "new": found under the new prefix, or marked migrated)? ── yes ──► new
       no
    verified token's access[].migration_eligible for this repository?
       ├─ true  ──► new   (paused: only if the repository is already new, else old)
       ├─ false ──► exists under NEW prefix? ── yes ──► new (permanent), no ──► old
       └─ absent ──► exists under NEW prefix? ── yes ──► new, no ──► old

"Exists under a prefix" means the repository's OWN entries (``_layers/``,
``_manifests/``, ``_uploads/``) are there: a child repository's entries never
count (:func:`.classifier.own_entries`).

"new" is permanent: a false flag cannot demote a repository that already lives
under the new prefix (routing it old would orphan its data there, and a push
to old would then make it "exists under old → old" for good). A false flag
costs one extra prefix check, only for a repository not already known new.

The flag is read only from claims :mod:`regmw.tokens` verified (signature,
expiry, issuer, audience); the caller passes ``None`` claims for anything else.
"""
from __future__ import annotations

import logging
from typing import Any

from regmw.tokens import access_entry

log = logging.getLogger("regmw.migration")

OLD = "old"
NEW = "new"

# What storage (or the cache) told us about a repository.
STATE_OLD = "old"          # something lies under the old prefix
STATE_NEW = "new"          # nothing under old, something under new (or marked migrated)
STATE_ABSENT = "absent"    # nothing under either
STATE_NOT_OLD = "not-old"  # nothing under old; the new prefix was not asked (not needed)


def token_flag(claims: dict[str, Any] | None, repository: str, needs_push: bool) -> bool | None:
    """The ``migration_eligible`` flag the verified token grants ``repository``, or None.

    ``needs_push``: prefer the access entry that grants push (for a
    cross-repository mount, the destination repository is the one that needs
    push; the source's entry names another repository and never counts).
    """
    entry = access_entry(claims, repository, "push") if needs_push else None
    entry = entry or access_entry(claims, repository)
    if entry is None or "migration_eligible" not in entry:
        return None
    flag = entry["migration_eligible"]
    if not isinstance(flag, bool):
        log.warning("ignoring non-boolean migration_eligible %r for %s", flag, repository)
        return None
    return flag


def needs_new_prefix(flag: bool | None, paused: bool) -> bool:
    """Whether the decision needs to know if the repository exists under the new prefix.

    Only a true flag with migration running can do without: it routes new either way.
    """
    return flag is not True or paused


def decide(state: str, flag: bool | None, paused: bool) -> tuple[str, str]:
    """(path, reason) for a repository in ``state`` and a token ``flag``.

    ``reason`` names what decided, in the tree's order: a repository known new
    (cached, marked, or found under the new prefix) is new whatever the flag
    says, so its reason is ``new_prefix`` (the cache or storage), never
    ``token``, and never ``token`` while paused either.
    """
    if state == STATE_OLD:
        return OLD, "old_prefix"
    if state == STATE_NEW:  # known new, permanent: the flag decides nothing (a false one cannot demote it)
        return NEW, "new_prefix"
    if flag is True:
        return (OLD, "paused") if paused else (NEW, "token")
    if flag is False:
        return OLD, "token"
    return OLD, "absent"
