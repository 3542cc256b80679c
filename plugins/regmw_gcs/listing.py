"""Read one ``objects.list`` answer strictly: only the shape the JSON API promises counts.

A delimited list (``prefix=P``, ``delimiter=/``) promises a JSON object whose

* ``items``, if present, is a list of objects, each with a string ``name``
  that starts with ``P`` and holds no ``/`` after it (deeper names collapse
  into ``prefixes``);
* ``prefixes``, if present, is a list of strings, each ``P`` + a segment
  without ``/`` + ``/``;
* ``nextPageToken``, if present, is a non-empty string.

Anything else (``{"items": {...}}``, ``"prefixes": "abc"``, items without
names, names or prefixes outside ``P``, a top-level list) is not an answer to
the question that was asked. Reading it as "something is there" would route a
repository on noise, so it raises :class:`MalformedAnswer`, which the storage
turns into :class:`regmw.errors.StorageError` (a 503 with Retry-After, never a
route, never cached). Unknown extra members are ignored: the API may add
fields.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class MalformedAnswer(ValueError):
    """The list answer does not have the shape the API promises for the request sent."""


@dataclass(frozen=True)
class ListPage:
    """What one page says: whether it holds any entry, and the token of the next page (or None)."""

    found: bool
    next_page_token: str | None


def read_page(answer: Any, prefix: str) -> ListPage:
    """Check ``answer`` (a decoded JSON body) against a delimited list of ``prefix``; raise if malformed."""
    if not isinstance(answer, dict):
        raise MalformedAnswer(f"the answer is a JSON {type(answer).__name__}, not an object")
    items = answer.get("items", [])
    prefixes = answer.get("prefixes", [])
    token = answer.get("nextPageToken")
    if not isinstance(items, list):
        raise MalformedAnswer(f"items is a {type(items).__name__}, not a list")
    if not isinstance(prefixes, list):
        raise MalformedAnswer(f"prefixes is a {type(prefixes).__name__}, not a list")
    if "nextPageToken" in answer and (not isinstance(token, str) or not token):
        raise MalformedAnswer(f"nextPageToken is {token!r}, not a non-empty string")
    for item in items:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            raise MalformedAnswer(f"an item without a string name: {_short(item)}")
        if not name.startswith(prefix) or "/" in name[len(prefix):]:
            raise MalformedAnswer(f"item {_short(name)} is not directly under the requested prefix {prefix!r}")
    for entry in prefixes:
        if not isinstance(entry, str):
            raise MalformedAnswer(f"a prefix that is not a string: {_short(entry)}")
        if not (entry.startswith(prefix) and entry.endswith("/") and len(entry) > len(prefix)
                and "/" not in entry[len(prefix):-1]):
            raise MalformedAnswer(f"prefix {_short(entry)} is not one level under the requested prefix {prefix!r}")
    return ListPage(bool(items or prefixes), token)


def _short(value: Any) -> str:
    return repr(value)[:80]
