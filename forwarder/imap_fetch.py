"""Reading messages over an IMAP session, so that one message the server cannot give
does not stop the others.

Dovecot answers a FETCH that includes an unreadable mail file with
`* BYE Internal error` (other servers with NO or BAD). `read_resilient` retries a
refused chunk in halves, reconnecting when the server hung up, down to single
messages, which it reports as `unreadable`. A connection that dropped without a BYE,
or a timeout, is not a refusal: it is raised, as before.
"""

from __future__ import annotations

import contextlib
import imaplib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

import structlog
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from forwarder.errors import ImapError, UnreadableMessage
from forwarder.imap_errors import TEMPORARY_CODES, response_code

log = structlog.get_logger("forwarder.imap")
PARTIAL_FETCH = 256 * 1024  # larger messages are read in parts of this size
EXPUNGED = "EXPUNGEISSUED"  # RFC 5530: the message went away meanwhile
T = TypeVar("T")
Reader = Callable[[IMAPClient, list[int]], dict[int, T]]


@dataclass
class Fetched(Generic[T]):
    """What a FETCH got: per UID, the data, or why the server would not give it."""

    found: dict[int, T] = field(default_factory=dict)
    unreadable: dict[int, UnreadableMessage] = field(default_factory=dict)


@dataclass(frozen=True)
class MessageInfo:
    size: int
    flags: frozenset[bytes]
    internaldate: datetime | None  # timezone-aware, as the server gave it


class Refused(Exception):
    """The server refused a command (NO, BAD; a BYE when `closed`)."""

    def __init__(self, text: str, *, closed: bool) -> None:
        super().__init__(text)
        self.text = text
        self.closed = closed


@contextlib.contextmanager
def refusals() -> Iterator[None]:
    """Turn the server's refusal of a command into `Refused`; a connection that dropped
    without a BYE is left to raise as it is."""
    try:
        yield
    except imaplib.IMAP4.abort as exc:
        if "socket error" in str(exc):  # imaplib's words for EOF: no BYE was seen
            raise
        raise Refused(server_text(exc), closed=True) from exc
    except IMAPClientError as exc:
        raise Refused(server_text(exc), closed=False) from exc


_IMAPLIB_PREFIX = re.compile(r"^(?:command: \w+ => )?(?:\w+ failed: |\w+ command error: BAD )?")


def server_text(exc: BaseException) -> str:
    """The server's own words inside an imaplib or imapclient exception."""
    for candidate in (exc, exc.__context__):
        if candidate is not None and candidate.args and isinstance(candidate.args[0], bytes):
            return candidate.args[0].decode("utf-8", "replace").strip()
    text = _IMAPLIB_PREFIX.sub("", str(exc), count=1)
    if text.startswith("[b'") and text.endswith("']"):  # BAD: imaplib prints the list
        text = text[3:-2]
    return text.strip()


def read_resilient(
    chunks: list[list[int]],
    read: Reader[T],
    *,
    session: Callable[[], IMAPClient],
    reconnect: Callable[[], None],
    server: str,
    into: Fetched[T] | None = None,
) -> Fetched[T]:
    """Read every chunk; a chunk the server refuses is split in halves, down to single
    messages, which are then reported as unreadable."""
    result: Fetched[T] = Fetched() if into is None else into
    stack = list(reversed(chunks))
    while stack:
        chunk = stack.pop()
        try:
            with refusals():
                result.found.update(read(session(), chunk))
            continue
        except Refused as refused:
            if refused.closed:
                reconnect()
            text = refused.text
        code = response_code(text)
        if code in TEMPORARY_CODES - {"SERVERBUG"}:
            raise ImapError(f"FETCH refused for now ({text})", server=server)
        log.debug("fetch_refused", uids=len(chunk), first_uid=chunk[0], error=text)
        if len(chunk) > 1:
            half = len(chunk) // 2
            stack += [chunk[half:], chunk[:half]]
        elif code != EXPUNGED:
            result.unreadable[chunk[0]] = UnreadableMessage(
                f"cannot give the message with UID {chunk[0]} ({text})",
                server=server,
                advice="see the server's log (a mail file it cannot read?)",
            )
    return result


def read_bodies(client: IMAPClient, chunk: list[int]) -> dict[int, bytes]:
    wanted = set(chunk)
    found: dict[int, bytes] = {}
    for uid, data in client.fetch(chunk, ["BODY.PEEK[]"]).items():
        raw = data.get(b"BODY[]")
        if int(uid) in wanted and isinstance(raw, bytes):
            found[int(uid)] = raw
    return found


def read_info(
    client: IMAPClient, chunk: list[int], *, dates: bool = False
) -> dict[int, MessageInfo]:
    """Size and flags of each message; with `dates`, its INTERNALDATE too (parsing one costs
    as much as the rest: only a folder seen anew needs them)."""
    wanted = set(chunk)
    found: dict[int, MessageInfo] = {}
    items = ["RFC822.SIZE", "FLAGS", *(["INTERNALDATE"] if dates else [])]
    for uid, data in client.fetch(chunk, items).items():
        if int(uid) in wanted:
            found[int(uid)] = MessageInfo(
                int(data.get(b"RFC822.SIZE", 0)),
                frozenset(bytes(f) for f in data.get(b"FLAGS", ())),
                data.get(b"INTERNALDATE"),
            )
    return found


def read_in_parts(
    sizes: Mapping[int, int], client: IMAPClient, chunk: list[int]
) -> dict[int, bytes]:
    """One large message, in partial fetches into one buffer: a whole-message FETCH costs
    about three times its size while the response is parsed."""
    uid = chunk[0]
    buffer = bytearray(sizes[uid])  # allocated once: growing it would copy it
    offset = 0
    while True:
        item = f"BODY.PEEK[]<{offset}.{PARTIAL_FETCH}>"
        data = client.fetch([uid], [item]).get(uid)
        if data is None:
            return {}  # expunged meanwhile
        part = data.get(f"BODY[]<{offset}>".encode())
        if not isinstance(part, bytes):
            return {}
        buffer[offset : offset + len(part)] = part
        offset += len(part)
        if len(part) < PARTIAL_FETCH:
            del buffer[offset:]  # the server's size was an estimate
            # bytes(buffer) would copy it: hand the buffer itself on (bytes-like).
            return {uid: buffer}  # type: ignore[dict-item]


def uid_set(uids: Sequence[int]) -> str:
    """A sequence set naming these UIDs, runs as ranges: `1:4,7,9:10`."""
    ordered = sorted(set(uids))
    runs: list[str] = []
    start = previous = ordered[0] if ordered else 0
    for uid in ordered[1:]:
        if uid != previous + 1:
            runs.append(f"{start}:{previous}" if previous > start else str(start))
            start = uid
        previous = uid
    if ordered:
        runs.append(f"{start}:{previous}" if previous > start else str(start))
    return ",".join(runs)


def chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
