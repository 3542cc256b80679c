"""PostgreSQL WAL positions (``pg_lsn``) as plain integers.

PostgreSQL prints an LSN as two hex halves, ``16/B374D848``; comparing the text
is wrong (``9/0`` > ``10/0``), so everything in the router works on the 64-bit
integer, and stores write it as a fixed-width 16-digit hex string that both
Python and the Redis Lua script compare exactly (a Lua number is a double and
would round a large LSN).
"""
from __future__ import annotations


def parse_lsn(text: str | None) -> int | None:
    """``"16/B374D848"`` → ``0x16B374D848``; None stays None."""
    if text is None:
        return None
    high, _, low = str(text).partition("/")
    if not low:
        raise ValueError(f"not a pg_lsn: {text!r}")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(value: int) -> str:
    """The PostgreSQL spelling, for logs and SQL (``'16/B374D848'::pg_lsn``)."""
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def to_key(value: int) -> str:
    """Fixed-width hex (16 digits): what the stores keep."""
    return f"{value:016X}"


def from_key(text: str | bytes | None) -> int | None:
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode()
    return int(text, 16)
