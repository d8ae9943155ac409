"""Header-only parsing of a raw message. Pure; the message bytes are never rebuilt.

Only the header block is looked at: it is split off the raw bytes, unfolded and
decoded leniently (8-bit and invalid UTF-8 bytes never raise).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_MSGID = re.compile(r"<\s*([^<>\s]+)\s*>")
# Trace headers differ between two copies of one message; they are left out of its identity.
TRACE_HEADERS = frozenset(
    {"received", "return-path", "delivered-to", "x-original-to", "envelope-to", "x-envelope-to"}
)


def split_message(raw: bytes) -> tuple[bytes, memoryview]:
    """(header block, body). A message without a blank line is all headers.

    The body is a view into `raw`, not a copy: it is only hashed.
    """
    view = memoryview(raw)
    if raw.startswith((b"\r\n", b"\n")):
        return b"", view[2 if raw.startswith(b"\r\n") else 1 :]
    match = _BLANK_LINE.search(raw)
    if match is None:
        return raw, view[len(raw) :]
    return raw[: match.start()], view[match.end() :]


@dataclass(frozen=True)
class Headers:
    """Header fields in order, names lower-cased, values unfolded."""

    fields: tuple[tuple[str, str], ...]

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.fields if key == name]

    def first(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def count(self, name: str) -> int:
        return len(self.get_all(name))


def parse_headers(header_block: bytes) -> Headers:
    text = header_block.decode("utf-8", errors="replace")
    fields: list[tuple[str, str]] = []
    for line in re.split(r"\r?\n", text):
        if not line:
            continue
        if line[0] in " \t":
            if fields:
                name, value = fields[-1]
                fields[-1] = (name, f"{value} {line.strip()}")
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or any(c in name for c in " \t"):
            continue  # not a header field; ignored rather than fatal
        fields.append((name.strip().lower(), value.strip()))
    return Headers(tuple(fields))


def message_id(headers: Headers) -> str | None:
    """The normalised Message-ID (`<...>` content, lower-cased), or None."""
    value = headers.first("message-id")
    if not value:
        return None
    match = _MSGID.search(value)
    ident = match.group(1) if match else value.strip()
    return ident.lower() or None


def message_key(header_block: bytes, headers: Headers, body: bytes | memoryview) -> str:
    """Identity of a message for deduplication across copies, polls and restarts.

    The normalised Message-ID, qualified by a digest of the body so that two
    different messages reusing one Message-ID are never taken for each other.
    Without a Message-ID: a digest of the non-trace headers and the body, so
    two copies delivered for two list addresses still share one key.
    """
    body_digest = hashlib.sha256(body).hexdigest()[:16]
    ident = message_id(headers)
    if ident is not None:
        return f"{ident}#{body_digest}"
    digest = hashlib.sha256()
    for line in re.split(rb"\r?\n(?![ \t])", header_block):
        name = line.partition(b":")[0].strip().lower()
        if line.strip() and name.decode("ascii", "replace") not in TRACE_HEADERS:
            digest.update(line.rstrip(b"\r") + b"\n")
    digest.update(b"\n")
    digest.update(body)
    return f"sha256:{digest.hexdigest()}"
