"""Secrets out of every text the process writes, in every form a secret takes as text.

A registered secret (the IMAP and SMTP passwords; the password of a URL, for a
database URL) is replaced by `***` wherever it appears in a text, spelt in any
of the ways that Python, a library or a renderer turns it into text:

* as is, or with its quotes and backslashes escaped (IMAP quoted string);
* escaped by repr() or ascii() (`\\xe9`, `\\u00e9`, `\\U0001f511`), by JSON
  (`\\u00e9`, surrogate pairs) or by both, at any depth (the repr of a repr
  in JSON doubles each backslash twice);
* as the repr of its UTF-8 or Latin-1 bytes (`\\xc3\\xa9`), its UTF-8 bytes
  read as Latin-1 (`Ã©`), or percent-encoded (`%C3%A9`, a URL);
* with the non-ASCII characters dropped, or replaced by `?` or U+FFFD;
* inside base64 (AUTH PLAIN and AUTH LOGIN send it so), at any alignment.

Every character of the secret matches any of its spellings, so mixed forms
match too. Pure: no I/O; `logs.py` applies it at the output boundary.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import threading
from collections.abc import Iterator
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import BaseModel, SecretBytes, SecretStr

MASK = "***"
_MIN_DERIVED = 4  # shorter lossy or base64 forms would mask ordinary text
_SHORT_ESCAPES = {"\t": "t", "\n": "n", "\r": "r", "\b": "b", "\f": "f", "\v": "v", "\0": "0"}


def _url_passwords(text: str) -> list[str]:
    """The passwords a URL carries: in its user part, and as libpq's `?password=`."""
    try:
        parts = urlsplit(text)
        query = parse_qs(parts.query)
    except ValueError:
        return []
    found = [parts.password] if parts.password else []
    return found + [value for value in query.get("password", []) if value]


def _byte(value: int) -> str:
    """One byte: as the Latin-1 character, escaped (\\xNN, \\u00NN) or percent-encoded."""
    char = chr(value)
    return rf"(?:{re.escape(char)}|\\+(?i:x{value:02x}|u00{value:02x})|(?i:%{value:02x}))"


def _char(char: str) -> str:
    """A regex matching one character of a secret in any of its spellings."""
    code = ord(char)
    if char.isascii() and char.isalnum():
        return re.escape(char)
    if char == "\\":
        return r"(?:\\+|(?i:%5c))"
    if char.isascii() and char.isprintable():  # punctuation: escaped or percent-encoded
        plus = r"|\+" if char == " " else ""
        return rf"(?:\\*{re.escape(char)}|(?i:%{code:02x}){plus})"
    spellings = [re.escape(char)]
    if char in _SHORT_ESCAPES:
        spellings.append(r"\\+" + _SHORT_ESCAPES[char])
    if code < 0x10000:
        spellings.append(rf"\\+(?i:u{code:04x})")
    else:
        spellings.append(rf"\\+(?i:U{code:08x})")
        high, low = divmod(code - 0x10000, 0x400)
        spellings.append(rf"\\+(?i:u{0xD800 + high:04x})\\+(?i:u{0xDC00 + low:04x})")
    spellings.append("".join(_byte(b) for b in char.encode("utf-8")))  # UTF-8, any spelling
    if not char.isascii():  # lost in an ASCII encoding: `?` or U+FFFD, per character or byte
        spellings.append(r"\?{1,4}|(?:\ufffd|\\+(?i:ufffd)){1,4}")
    if code < 0x100:
        spellings.append(_byte(code))  # Latin-1
    return "(?:" + "|".join(spellings) + ")"


def _base64_cores(data: bytes) -> set[str]:
    """The base64 characters that depend on `data` only, for each of its 3 alignments."""
    cores = set()
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + data + b"\0\0\0").decode()
        core = encoded[-(-shift * 8 // 6) : (shift + len(data)) * 8 // 6]
        cores |= {core, core.translate(str.maketrans("+/", "-_"))}  # and URL-safe base64
    return cores


def _literals(secret: str) -> set[str]:
    """The spellings matched as plain text: base64 cores, ASCII with the rest dropped."""
    literals = {secret.encode("ascii", "ignore").decode()}
    for encoding in ("utf-8", "latin-1"):
        try:
            literals |= _base64_cores(secret.encode(encoding))
        except UnicodeEncodeError:
            continue
    return {text for text in literals if len(text) >= _MIN_DERIVED and text != secret}


def pattern(secret: str) -> str:
    """A regex matching `secret` in every form listed in the module docstring."""
    literals = sorted(_literals(secret), key=len, reverse=True)
    return "|".join(["".join(_char(c) for c in secret)] + [re.escape(t) for t in literals])


def needles(secret: str) -> set[str] | None:
    """Substrings of which every match of pattern(secret) holds one (None: no such set).

    The secret's longest run of ASCII letters and digits, spelt alike in every form,
    and the plain-text spellings: a text with none of them needs no regex search.
    """
    runs = re.findall("[A-Za-z0-9]+", secret)
    if not runs:
        return None
    return {max(runs, key=len)} | _literals(secret)


class Redactor:
    """The registered secrets; `scrub()` replaces each of their forms by MASK."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._regex: re.Pattern[str] | None = None
        self._needles: tuple[str, ...] | None = None
        self._lock = threading.Lock()

    def register(self, secret: str | SecretStr | SecretBytes | None) -> None:
        if isinstance(secret, SecretStr | SecretBytes):
            secret = _plain(secret)
        if not secret:
            return
        found = {secret}
        for password in _url_passwords(secret):  # as is and percent-decoded
            found |= {password, unquote(password)}
        with self._lock:
            if found <= self._secrets:
                return
            self._secrets |= found
            longest_first = sorted(self._secrets, key=len, reverse=True)
            found_needles = [needles(s) for s in longest_first]
            self._needles = (
                None
                if any(n is None for n in found_needles)
                else tuple({n for each in found_needles if each for n in each})
            )
            self._regex = re.compile("|".join(f"(?:{pattern(s)})" for s in longest_first))

    def scrub(self, text: str) -> str:
        regex, quick = self._regex, self._needles
        if regex is None or (quick is not None and not any(n in text for n in quick)):
            return text
        return regex.sub(MASK, text)

    def scrub_bytes(self, data: bytes) -> bytes | str:
        """`data` unchanged, or its repr scrubbed if that held a secret."""
        if self._regex is None:
            return data
        text = repr(data)
        scrubbed = self.scrub(text)
        return data if scrubbed == text else scrubbed


def _plain(secret: SecretStr | SecretBytes) -> str:
    value = secret.get_secret_value()
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def secret_values(value: object) -> Iterator[str]:
    """Every SecretStr / SecretBytes in settings, endpoints, mailboxes, however nested."""
    if isinstance(value, SecretStr | SecretBytes):
        yield _plain(value)
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from secret_values(getattr(value, name))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            yield from secret_values(getattr(value, item.name))
    elif isinstance(value, dict):
        for item in value.values():
            yield from secret_values(item)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from secret_values(item)


REDACTOR = Redactor()


def register_secret(*secrets: str | SecretStr | SecretBytes | None) -> None:
    """From now on, every output of the process masks these secrets."""
    for secret in secrets:
        REDACTOR.register(secret)


def scrub(text: str) -> str:
    return REDACTOR.scrub(text)


def scrub_bytes(data: bytes) -> bytes | str:
    return REDACTOR.scrub_bytes(data)
