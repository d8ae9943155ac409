"""Mail addresses: validation, normalisation and extraction from header values. Pure."""

from __future__ import annotations

import re
from collections.abc import Iterable
from email.utils import getaddresses

_ATOM_CHARS = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_ATOM = rf"[{_ATOM_CHARS}]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# A match only starts where a run of address characters starts: trying every position
# inside a long run made findall() quadratic (minutes for a hostile 100 KB To line).
_ADDRESS = re.compile(rf"(?<![.{_ATOM_CHARS}]){_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*\.?")
# No '@' in the local part and no optional '<' between two runs of spaces: both made
# the search backtrack quadratically on hostile input.
_RECEIVED_FOR = re.compile(r"\bfor\s+(?:<\s*)?([^\s<>;\"@]+@[^\s<>;\"]+?)\s*>?\s*(?:;|\s|$)", re.I)

# Header values simple enough not to need the full RFC 5322 parser (most To/Cc/From):
# plain addresses separated by commas, or one `Display Name <address>`.
_SPECIALS = frozenset('"()<>\\:;')
_NAME_ADDR = re.compile(r'\s*[^"()<>\\,:;]*<([^"()<>\\,:;\s]+)>\s*')

# Parsing a header is bounded: a hostile 10 MB To line is cut, not parsed whole.
MAX_PARSED_HEADER = 256 * 1024


def is_valid_address(value: str) -> bool:
    """A plain `local@domain` address (no display name, no whitespace, no CR/LF)."""
    return len(value) <= 254 and _ADDRESS.fullmatch(value.strip()) is not None


def normalize(address: str) -> str:
    """Compare form: lower case, angle brackets removed, `+detail` dropped.

    `Contact+Urgent@Example.ORG` -> `contact@example.org`.
    """
    addr = address.strip()
    if addr.islower() and "+" not in addr and "<" not in addr and not addr.endswith("."):
        return addr  # already in compare form: the common case, kept cheap
    addr = addr.strip("<>").strip().lower().rstrip(".")
    local, at, domain = addr.rpartition("@")
    if not at:
        return addr
    local = local.partition("+")[0] or local
    return f"{local}@{domain}"


def addresses_in(values: Iterable[str]) -> list[str]:
    """Normalised addresses named in address header values (To, Cc, Delivered-To ...)."""
    found: list[str] = []
    for value in values:
        value = value[:MAX_PARSED_HEADER]
        candidates = _simple_candidates(value)
        if candidates is None:
            try:
                pairs = getaddresses([value])
            except Exception:  # hostile input must never stop routing
                pairs = []
            candidates = [addr for _, addr in pairs if addr]
        if not any(is_valid_address(c) for c in candidates):
            candidates = _ADDRESS.findall(value)
        found.extend(normalize(c) for c in candidates if is_valid_address(c))
    return found


def _simple_candidates(value: str) -> list[str] | None:
    """The addresses of a simple value without the full parser; None when it is not simple."""
    if _SPECIALS.isdisjoint(value):
        return [part.strip() for part in value.split(",") if part.strip()]
    match = _NAME_ADDR.fullmatch(value)
    return [match.group(1)] if match else None


def received_for(value: str) -> str | None:
    """The address of a `Received:` header's `for <address>` clause, normalised."""
    match = _RECEIVED_FOR.search(value[:MAX_PARSED_HEADER])
    if match and is_valid_address(match.group(1)):
        return normalize(match.group(1))
    return None
