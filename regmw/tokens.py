"""Registry bearer tokens, verified before a single claim is believed.

The token's signature, expiry, issuer and audience must all verify (PyJWT,
keys and algorithms from ``[auth]``). Anything else (no token, unsigned
``alg: none``, expired, forged, malformed) yields ``None`` and a log line:
an unverified claim never influences a decision.
"""
from __future__ import annotations

import logging
from typing import Any

import jwt

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
        """Build from ``[auth]``; a missing key file or a key no algorithm accepts is a ConfigError now."""
        key = section.get("key")
        if section.get("key_file"):
            try:
                with open(section["key_file"], encoding="utf-8") as handle:
                    key = handle.read()
            except OSError as exc:
                raise ConfigError(f"auth.key_file: cannot read {section['key_file']}: {exc.strerror}") from None
        if not key:
            return None
        verifier = cls(key, section["algorithms"], section.get("issuer"), section.get("audience"), section["leeway"])
        verifier._check_key()
        return verifier

    def _check_key(self) -> None:
        """Refuse at start-up a key that none of the configured algorithms can use (a bad PEM, say)."""
        algorithms = jwt.algorithms.get_default_algorithms()
        unknown = [alg for alg in self.algorithms if alg not in algorithms]
        if unknown or not self.algorithms:
            raise ConfigError(f"auth.algorithms: unsupported {unknown or 'empty list'}")
        for name in self.algorithms:
            try:
                algorithms[name].prepare_key(self.key)
                return
            except (jwt.InvalidKeyError, ValueError, TypeError):
                continue
        raise ConfigError(f"auth.key: not a usable key for any of {', '.join(self.algorithms)}")

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
            log.warning("ignoring bearer token that does not verify: %s", exc)
            return None


def access_entry(claims: dict[str, Any] | None, repository: str, action: str | None = None) -> dict | None:
    """The ``access[]`` entry of verified claims for ``repository`` (and ``action``), if any."""
    if not claims:
        return None
    for entry in claims.get("access") or ():
        if not isinstance(entry, dict) or entry.get("type") != "repository" or entry.get("name") != repository:
            continue
        if action is None or action in (entry.get("actions") or ()):
            return entry
    return None
