"""What the process must never write: a secret in any spelling, a raw control character.

The spellings are computed here independently of forwarder/redact.py; the tests
scan what a process wrote for each of them.
"""

from __future__ import annotations

import base64
import json
import re
from urllib.parse import quote, quote_plus

# Everything that can start or end a terminal escape sequence, move the cursor or
# ring: C0 (but LF), DEL, C1 (CSI is 0x9b), and the bidi overrides.
RAW_CONTROLS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

SECRET = 'pä"ss\'wö\\rd-€-🔑 x'
ASCII_SECRET = "canary-Pw-7f3Qz9"


def base64_of_secret(prefix: bytes, secret: bytes) -> str:
    """The characters of base64(prefix + secret) that encode the secret's bytes only."""
    encoded = base64.b64encode(prefix + secret).decode()
    return encoded[-(-len(prefix) * 8 // 6) : (len(prefix) + len(secret)) * 8 // 6]


def spellings(secret: str) -> dict[str, str]:
    raw = secret.encode()
    imap_quoted = secret.replace("\\", "\\\\").replace('"', '\\"')
    return {
        "plain": secret,
        "repr": repr(secret),
        "ascii": ascii(secret),
        "utf-8 bytes repr": repr(raw),
        "latin-1 bytes repr": repr(secret.encode("latin-1", "replace")),
        "utf-8 read as latin-1": raw.decode("latin-1"),
        "json": json.dumps(secret),
        "json, not ascii": json.dumps(secret, ensure_ascii=False),
        "repr of repr": repr(repr(secret)),
        "json of repr": json.dumps(repr(secret)),
        "json of bytes repr": json.dumps(repr(raw)),
        "repr of an exception": repr(ValueError(repr(raw))),
        "json of ascii of repr": json.dumps(ascii(repr(secret))),
        "imap quoted": f'"{imap_quoted}"',
        "UnicodeEncodeError": repr(UnicodeEncodeError("ascii", f'"{imap_quoted}"', 2, 3, "x")),
        "percent-encoded": quote(secret, safe=""),
        "form-encoded": quote_plus(secret),
        "ascii, rest dropped": secret.encode("ascii", "ignore").decode(),
        "ascii, rest as ?": secret.encode("ascii", "replace").decode(),
        "AUTH LOGIN": base64_of_secret(b"", raw),
        "AUTH PLAIN": base64_of_secret(b"\0relay@example.org\0", raw),
        "AUTH PLAIN, authzid": base64_of_secret(b"a\0relay@example.org\0", raw),
        "XOAUTH2": base64_of_secret(b"user=u\x01auth=Bearer ", raw),
    }
