"""The text of a lists file: JSON, or the aliases(5) syntax administrators know. Pure.

    # comments on their own lines
    contact@example.org: alice@example.org, bob@example.org
    compta@example.org: bob@example.org,
        carol@example.org          <- a line starting with a space continues the previous one

A text whose first non-blank character is `{` is JSON. Errors say where (`line 3`,
`line 1, column 137`); the caller puts the file's name in front.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from forwarder.addresses import normalize

_SEPARATORS = re.compile(r"[,\s]+")
ALIASES_HINT = "expected 'list@domain: member@domain, member@domain'"


@dataclass(frozen=True)
class ListsText:
    """What a lists text says, before validation: {list address: [members]} as written."""

    lists: dict[str, Any]
    lines: dict[str, int] = field(default_factory=dict)  # list address -> line (aliases only)


def is_json(text: str) -> bool:
    return text.lstrip().startswith("{")


def parse_json(text: str) -> ListsText:
    """JSON: an error names the line and column, a list written twice is refused."""
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg})"
        ) from None
    return ListsText(value)


def parse_lists_text(text: str) -> ListsText:
    """JSON or the aliases syntax, told apart by the first non-blank character."""
    return parse_json(text) if is_json(text) else parse_aliases(text)


def parse_aliases(text: str) -> ListsText:
    entries: list[tuple[int, str]] = []  # (first line, logical line)
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0].isspace():
            if not entries:
                raise ValueError(
                    f"line {number}: starts with a space, so it continues a list, but no "
                    "list comes before it"
                )
            first, logical = entries[-1]
            entries[-1] = (first, f"{logical} {stripped}")
            continue
        entries.append((number, stripped))
    lists: dict[str, Any] = {}
    lines: dict[str, int] = {}
    seen: dict[str, int] = {}
    for number, logical in entries:
        address, colon, rest = logical.partition(":")
        address = address.strip()
        if not colon or not address:
            raise ValueError(f"line {number}: {ALIASES_HINT}")
        key = normalize(address)
        if key in seen:
            raise ValueError(f"line {number}: list {key} is already defined on line {seen[key]}")
        seen[key] = number
        lists[address] = [member for member in _SEPARATORS.split(rest) if member]
        lines[address] = number
    return ListsText(lists, lines)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"{key!r} appears twice in one JSON object")
        out[key] = value
    return out
