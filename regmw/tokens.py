"""Registry bearer tokens, verified before a single claim is believed.

The token's signature, expiry, issuer and audience must all verify (PyJWT,
keys and algorithms from ``[auth]``). Anything else (no token, unsigned
``alg: none``, expired, forged, malformed) yields ``None`` and a log line:
an unverified claim never influences a decision.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jwt

from . import metrics
from .errors import ConfigError

log = logging.getLogger("regmw.tokens")


class TokenVerifier:
    def __init__(
        self,
        key: str | None,
        algorithms: list[str],
        issuer: str | None = None,
        audience: str | None = None,
        leeway: float = 0.0,
    ) -> None:
        self.key = key
        self.algorithms = [alg for alg in algorithms if alg.lower() != "none"]
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> TokenVerifier | None:
        """Build from a validated ``[auth]`` (:func:`check_auth` has already accepted its key and algorithms)."""
        key = read_key(section)
        if not key:
            return None
        return cls(key, section["algorithms"], section.get("issuer"), section.get("audience"), section["leeway"])

    def verify(self, authorization: str | None) -> dict[str, Any] | None:
        """Return the verified claims of an ``Authorization: Bearer`` header, else None."""
        if not authorization or authorization[:7].lower() != "bearer ":
            return None
        token = authorization[7:].strip()
        required = ["exp"] + (["iss"] if self.issuer else []) + (["aud"] if self.audience else [])
        try:
            return jwt.decode(
                token,
                self.key,
                algorithms=self.algorithms,
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options={"require": required},
            )
        except jwt.PyJWTError as exc:
            metrics.warn_at_most_every(1.0, "bearer-token", log, "ignoring bearer token that does not verify: %s", exc)
            return None


def read_key(section: Mapping[str, Any]) -> str | None:
    """The verification key: ``key``, or the contents of ``key_file``; ConfigError if the file cannot be read.

    The file's trailing line breaks are not part of the key: ``echo secret > file``
    (and most editors) end it with one, which an HMAC secret would otherwise
    include, so that no token verified; a PEM reads the same without them.
    """
    if not section.get("key_file"):
        return section.get("key")
    try:
        with open(section["key_file"], encoding="utf-8") as handle:
            return handle.read().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"auth.key_file: cannot read {section['key_file']}: {exc.strerror}") from None


_HMAC = ("HS256", "HS384", "HS512")


def check_auth(section: Mapping[str, Any], config: Any = None) -> str | None:
    """`key` or `key_file`, not both; every algorithm known to PyJWT and either all HMAC (`HS*`, key = a secret) or all public-key (`RS*`/`PS*`/`ES*`/`EdDSA`, key = a PEM); the key usable by at least one of them."""
    if section.get("key") and section.get("key_file"):
        return "auth.key and auth.key_file are both set (give the key one way)"
    try:
        key = read_key(section)
    except ConfigError as exc:
        return str(exc)
    if not key:
        return None
    algorithms = [alg for alg in section["algorithms"] if alg.lower() != "none"]
    known = jwt.algorithms.get_default_algorithms()
    unknown = [alg for alg in algorithms if alg not in known]
    if unknown or not algorithms:
        return f"auth.algorithms: unsupported {unknown or 'empty list'}"
    hmac = [alg for alg in algorithms if alg in _HMAC]
    if hmac and len(hmac) != len(algorithms):
        # One key cannot be both a shared secret and a public key; accepting both kinds is how
        # algorithm-confusion forgeries start.
        return f"auth.algorithms: mixes HMAC ({', '.join(hmac)}) with public-key algorithms; one key serves one kind"
    for name in algorithms:
        try:
            known[name].prepare_key(key)
            return None
        except (jwt.InvalidKeyError, ValueError, TypeError):
            continue
    return f"auth.key: not a usable key for any of {', '.join(algorithms)}"


def access_entry(claims: dict[str, Any] | None, repository: str, action: str | None = None) -> dict | None:
    """The ``access[]`` entry of verified claims for ``repository`` (and ``action``), if any.

    A verified token can still be malformed (its issuer's bug): ``access`` that
    is not a list has no entries, ``actions`` that is not a list grants no action.
    """
    if not claims:
        return None
    access = claims.get("access")
    for entry in access if isinstance(access, list) else ():
        if not isinstance(entry, dict) or entry.get("type") != "repository" or entry.get("name") != repository:
            continue
        actions = entry.get("actions")
        if action is None or (isinstance(actions, list) and action in actions):
            return entry
    return None
