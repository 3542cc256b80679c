"""Standard Webhooks signatures (https://www.standardwebhooks.com), with secret rotation.

Signing is the ``standardwebhooks`` package's own ``Webhook.sign``, so a
receiver's ``Webhook(secret).verify(body, headers)`` accepts what we send.
During a rotation an endpoint has several secrets: every one signs, and the
``webhook-signature`` header carries all the signatures separated by spaces
(the spec's format), so receivers holding either the old or the new secret
verify.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timezone

from standardwebhooks import Webhook


class Signer:
    """Signs bodies for one endpoint with each of its secrets."""

    def __init__(self, secrets: Sequence[str]) -> None:
        self._hooks = [Webhook(secret) for secret in secrets]

    def headers(self, message_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
        """``webhook-id``, ``webhook-timestamp`` and (with secrets) ``webhook-signature``."""
        stamp = int(time.time() if now is None else now)
        headers = {"webhook-id": message_id, "webhook-timestamp": str(stamp)}
        if self._hooks:
            when = datetime.fromtimestamp(stamp, timezone.utc)
            text = body.decode()
            headers["webhook-signature"] = " ".join(hook.sign(message_id, when, text) for hook in self._hooks)
        return headers
