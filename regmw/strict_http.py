"""An HTTP/1.1 response reader strict where a proxy or a sender must be (RFC 9112).

http.client reads an answer leniently: fine for a client that only wants a
body, wrong for the gateway, which passes the head on to its own client, and
for the webhook sender, which acknowledges events on a 2xx. Both take their
upstream's or receiver's answers through :class:`StrictResponse`.
"""
from __future__ import annotations

import email.errors
import http.client
import re
from typing import Any

#: Interim (1xx) answers skipped before the final one, at most; an upstream that sends more is a 502.
MAX_INTERIM = 16
#: Defects of a parsed head that concern only a multipart body, which http.client never parses: not framing.
_BODY_DEFECTS = (email.errors.StartBoundaryNotFoundDefect, email.errors.MultipartInvariantViolationDefect)
#: 1*DIGIT: a Content-Length (RFC 9110 8.6), a Retry-After's delta-seconds. ``int()`` also takes ``+5``,
#: `` 5``, ``5_0`` and other scripts' digits.
DIGITS = re.compile(r"[0-9]+")


class StrictResponse(http.client.HTTPResponse):
    """http.client's response, strict where a proxy must be (RFC 9112): a head it cannot pass on safely is a 502.

    (Also the webhook sender's, ``regmw_notify.deliver``: a head cut short is no 2xx to acknowledge on.)
    Left to http.client, the gateway passed on:

    * an interim 103 Early Hints (or 102) as the final answer: the client got
      the 103 and never the answer, which was left in the connection (http.client
      skips only 100). Every 1xx is skipped now, at most :data:`MAX_INTERIM`;
      a 101 nobody asked for is refused (the gateway never asks to upgrade);
    * a head the upstream hung up in (before its empty line) as a whole one:
      ``HTTP/1.1 200 OK\\r\\nContent-Le`` and EOF became a 200 with an empty body;
    * a head with a line it cannot parse (a name with a space or NUL, no
      colon): the parser drops that line and every one after it, Content-Length
      included, and the body was then read until the upstream closed;
    * a Transfer-Encoding other than ``chunked``, or a Content-Length that is not
      one number (two that differ, ``5, 10``, ``-1``, ``+5``): RFC 9112 6.3 makes
      both a 502 for a proxy; gunicorn refused to send the malformed ones (a 500
      from the app) and passed two differing ones on.

    :attr:`declared_length` is the checked Content-Length (None without one, or
    with chunked framing, which overrides it): the only Content-Length the client gets.
    """

    declared_length: int | None = None

    def begin(self) -> None:
        if self.headers is not None:
            return
        raw = self.fp
        self.fp = head = _HeadReader(raw)
        try:
            super().begin()
        finally:
            if self.fp is head:  # (None when http.client closed it on a bad status line)
                self.fp = raw
        if head.cut:
            raise http.client.IncompleteRead(b"", None)
        defects = [defect for defect in self.msg.defects if not isinstance(defect, _BODY_DEFECTS)]
        if defects:
            raise http.client.HTTPException(f"unparseable response head: {defects[0]!r}")
        if self.msg.get_all("Transfer-Encoding") and not self.chunked:
            raise http.client.UnknownTransferEncoding(self.msg.get("Transfer-Encoding"))
        lengths = set(self.msg.get_all("Content-Length") or ())
        if lengths and not self.chunked:
            if len(lengths) > 1 or not DIGITS.fullmatch(next(iter(lengths))):
                raise http.client.HTTPException(f"bad Content-Length {sorted(lengths)!r}")
            self.declared_length = int(lengths.pop())

    def _read_status(self) -> tuple[str, int, str]:
        """The final status line: interim 1xx answers (and their heads) skipped, a 101 refused."""
        for _ in range(MAX_INTERIM):
            version, status, reason = super()._read_status()
            if status == 101:
                raise http.client.HTTPException("101 Switching Protocols, which the gateway never asks for")
            if status >= 200:
                return version, status, reason
            http.client.parse_headers(self.fp)
        raise http.client.HTTPException(f"more than {MAX_INTERIM} interim (1xx) answers")


class _HeadReader:
    """http.client's reader while it reads a response head: notes a line that ended at EOF, not at a newline,
    and makes a bare CR inside a line a space."""

    __slots__ = ("raw", "cut")

    def __init__(self, raw: Any) -> None:
        self.raw, self.cut = raw, False

    def readline(self, limit: int = -1) -> bytes:
        line = self.raw.readline(limit)
        if not line.endswith(b"\n"):
            self.cut = True
            return line
        content = line.rstrip(b"\r\n")
        if b"\r" in content:  # a bare CR, which email's parser takes for a line's end: the rest became a header
            line = content.replace(b"\r", b" ") + line[len(content):]  # RFC 9112 2.2: a space
        return line

    def close(self) -> None:
        self.raw.close()
