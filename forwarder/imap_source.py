"""The catch-all mailbox, over IMAP (imapclient, blocking: call it from a thread).

Reads with BODY.PEEK[] so that reading never sets \\Seen; marks only when told
to. Every failure becomes an `ImapError` that names the server and says what to
do; a login refused for now (`ImapBusyError`: a connection limit) is told apart
from refused credentials (`ImapAuthError`), see `forwarder.imap_errors`.

A message the server cannot give does not stop the others: `fetch` and
`message_info` return it in `unreadable` (`forwarder.imap_fetch`).

Keywords are optional marks: `keywords` says whether the folder keeps
`$Forwarded` for good (PERMANENTFLAGS has it or `\\*`). `mark()` stores keywords
apart from `\\Seen` (Courier answers BAD to a STORE naming a keyword, losing the
`\\Seen` of the same STORE), without `.SILENT`, and returns the UIDs whose FLAGS
did not keep them: a server may answer OK and drop them.
"""

from __future__ import annotations

import contextlib
import imaplib
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial, wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from forwarder.errors import ImapError
from forwarder.imap_connect import connection_failure, open_session
from forwarder.imap_fetch import (
    PARTIAL_FETCH,
    Fetched,
    MessageInfo,
    Reader,
    Refused,
    chunks,
    read_bodies,
    read_in_parts,
    read_info,
    read_resilient,
    refusals,
    server_text,
    uid_set,
)
from forwarder.mailbox import ImapEndpoint

__all__ = [
    "FORWARDED",
    "FORWARD_FAILED",
    "PARTIAL_FETCH",
    "QUARANTINE",
    "SEEN",
    "Fetched",
    "ImapSource",
    "MessageInfo",
]

FORWARDED = b"$Forwarded"
FORWARD_FAILED = b"$ForwardFailed"
QUARANTINE = b"$ForwarderQuarantine"
SEEN = b"\\Seen"
_UID_CHUNK = 1000

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def _wrap_errors(method: Callable[P, R]) -> Callable[P, R]:
    """Turn socket, TLS and protocol failures into one ImapError naming the server."""

    @wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        self = args[0]
        assert isinstance(self, ImapSource)
        try:
            return method(*args, **kwargs)
        except ImapError:
            self.drop()
            raise
        except (OSError, imaplib.IMAP4.error, IMAPClientError) as exc:
            self.drop()
            raise connection_failure(exc, self.endpoint, self.ca_file) from exc

    return wrapper


class ImapSource:
    """One IMAP connection to the catch-all folder."""

    def __init__(self, endpoint: ImapEndpoint, ca_file: Path | None = None) -> None:
        self.endpoint = endpoint
        self.ca_file = ca_file
        self.server = endpoint.server
        self.client: IMAPClient | None = None
        self.uidvalidity: int = 0
        self.uidnext: int | None = None  # from SELECT; None if the server did not say
        self.permanent_flags: frozenset[bytes] = frozenset()
        self.keywords_refused: str | None = None  # the server's answer to a keyword STORE
        self.capabilities: frozenset[bytes] = frozenset()
        # EXAMINE instead of SELECT (the dry run): nothing in the folder changes, not even
        # \Recent; PERMANENTFLAGS is then empty, so `keywords` is False.
        self.readonly = False

    @property
    def mailbox_id(self) -> str:
        """Stable name of the selected mailbox; changes when UIDVALIDITY does."""
        e = self.endpoint
        return f"{e.username}@{e.host}:{e.port}/{e.folder};UIDVALIDITY={self.uidvalidity}"

    @property
    def connected(self) -> bool:
        return self.client is not None

    @property
    def keywords(self) -> bool:
        """Whether the folder keeps `$Forwarded` for good (and no keyword STORE failed)."""
        return self.keeps(FORWARDED)

    def keeps(self, keyword: bytes) -> bool:
        """RFC 3501 2.3.2: a flag not in PERMANENTFLAGS (nor allowed by `\\*`) lasts only
        for the session."""
        if self.keywords_refused is not None:
            return False
        permanent = {f.lower() for f in self.permanent_flags}
        return b"\\*" in permanent or keyword.lower() in permanent

    def _session(self) -> IMAPClient:
        if self.client is None:
            raise ImapError("the connection was lost; reconnecting next cycle", server=self.server)
        return self.client

    @_wrap_errors
    def connect(self) -> None:
        """Connect, log in and select the folder."""
        self.drop()
        self.client = open_session(self.endpoint, self.ca_file)
        self.capabilities = frozenset(self.client.capabilities())
        self._select()

    def _select(self) -> None:
        assert self.client is not None
        folder = self.endpoint.folder
        try:
            info = self.client.select_folder(folder, readonly=self.readonly)
        except IMAPClientError as exc:
            raise ImapError(
                f"cannot select folder {folder!r} ({server_text(exc)})",
                server=self.server,
                settings=("FORWARDER_IMAP_FOLDER",),
            ) from None
        self.uidvalidity = int(info.get(b"UIDVALIDITY", 0))
        self.uidnext = int(info[b"UIDNEXT"]) if b"UIDNEXT" in info else None
        self.permanent_flags = frozenset(bytes(f) for f in info.get(b"PERMANENTFLAGS", ()))
        self.keywords_refused = None

    @_wrap_errors
    def noop(self) -> None:
        self._session().noop()

    @_wrap_errors
    def unforwarded_uids(self) -> list[int]:
        """UIDs without `$Forwarded` nor `$ForwarderQuarantine`, oldest first (migration from
        keyword-only bookkeeping)."""
        client = self._session()
        criteria = ["UNKEYWORD", FORWARDED.decode(), "UNKEYWORD", QUARANTINE.decode()]
        return sorted(int(u) for u in client.search(criteria))

    @_wrap_errors
    def uids_above(self, uid: int) -> list[int]:
        """UIDs greater than `uid`, ascending (`UID SEARCH UID uid+1:*`).

        Sees every message delivered before the call: a NOOP first, as Dovecot shows new
        mail to a selected session only then, not to a SEARCH. RFC 3501 6.4.8: `n:*`
        always includes the highest UID, even when it is below n: the answer is filtered.
        """
        client = self._session()
        client.noop()
        found = client.search(["UID", f"{uid + 1}:*"])
        return sorted(u for u in (int(x) for x in found) if u > uid)

    @_wrap_errors
    def all_uids(self) -> list[int]:
        """Every UID of the folder, ascending (a folder seen for the first time)."""
        return sorted(int(u) for u in self._session().search(["ALL"]))

    @_wrap_errors
    def message_info(self, uids: Sequence[int], *, dates: bool = False) -> Fetched[MessageInfo]:
        """Size and flags of these messages, with `dates` their INTERNALDATE too (the
        server's index, not the bodies); expunged UIDs are simply absent."""
        read = partial(read_info, dates=True) if dates else read_info
        return self._read(list(chunks(sorted(uids), _UID_CHUNK)), read)

    @_wrap_errors
    def sizes(self, uids: Sequence[int]) -> dict[int, int]:
        return {uid: info.size for uid, info in self.message_info(uids).found.items()}

    @_wrap_errors
    def fetch(self, uids: Sequence[int], sizes: Mapping[int, int]) -> Fetched[bytes]:
        """Raw bytes of these messages, read with BODY.PEEK[] (no \\Seen); a message larger
        than PARTIAL_FETCH is read in parts."""
        small = [uid for uid in uids if sizes.get(uid, 0) <= PARTIAL_FETCH]
        large = [[uid] for uid in uids if sizes.get(uid, 0) > PARTIAL_FETCH]
        result = self._read([small] if small else [], read_bodies)
        return self._read(large, partial(read_in_parts, sizes), into=result)

    def _read(
        self, parts: list[list[int]], read: Reader[T], into: Fetched[T] | None = None
    ) -> Fetched[T]:
        return read_resilient(
            parts,
            read,
            session=self._session,
            reconnect=self._reconnect,
            server=self.server,
            into=into,
        )

    def _reconnect(self) -> None:
        """After a BYE: a new session on the same folder, or an error if its UIDs changed."""
        uidvalidity = self.uidvalidity
        self.connect()
        if self.uidvalidity != uidvalidity:
            raise ImapError(
                f"UIDVALIDITY changed from {uidvalidity} to {self.uidvalidity} meanwhile",
                server=self.server,
            )

    @_wrap_errors
    def mark(self, uids: Iterable[int], flags: Sequence[bytes]) -> list[int]:
        """Add `flags`; return the UIDs that did not keep every keyword among them.

        System flags go in a STORE of their own. A keyword the folder cannot keep is not
        asked for; a keyword STORE refused with NO or BAD turns `keywords` off for the
        session instead of failing.
        """
        client = self._session()
        system = [f for f in flags if f.startswith(b"\\")]
        keywords = [f for f in flags if not f.startswith(b"\\")]
        not_kept: set[int] = set()
        for chunk in chunks(sorted(uids), _UID_CHUNK):
            wanted = [k for k in keywords if self.keeps(k)]
            if len(wanted) < len(keywords):
                not_kept.update(chunk)
            if wanted:
                not_kept.update(self._store_keywords(client, chunk, wanted))
            if system:
                client.add_flags(chunk, system, silent=True)
        return sorted(not_kept)

    def _store_keywords(
        self, client: IMAPClient, chunk: list[int], wanted: list[bytes]
    ) -> set[int]:
        """STORE, then ask the server which of these messages lack a keyword.

        The check is a SEARCH, whose answer names only the messages that did not keep
        it (usually none): reading back the FLAGS of every message would cost a parsed
        response per message, on a path that runs for every message forwarded.
        """
        try:
            with refusals():
                client.add_flags(chunk, wanted, silent=True)
        except Refused as refused:
            if refused.closed:
                raise ImapError(
                    f"closed the connection ({refused.text})", server=self.server
                ) from None
            self.keywords_refused = refused.text
            return set(chunk)
        lacking: list[object] = ["UNKEYWORD", wanted[-1].decode()]
        for keyword in reversed(wanted[:-1]):
            lacking = ["OR", "UNKEYWORD", keyword.decode(), *lacking]
        found = client.search(["UID", uid_set(chunk), *lacking])
        return {int(uid) for uid in found} & set(chunk)

    def drop(self) -> None:
        """Forget the connection without talking to the server."""
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):  # already broken: nothing more to do
                client.shutdown()

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            try:
                client.logout()
            except Exception:
                with contextlib.suppress(Exception):
                    client.shutdown()

    def describe_capabilities(self) -> dict[str, Any]:
        return {
            "idle": b"IDLE" in self.capabilities,
            "move": b"MOVE" in self.capabilities,
            "keywords": self.keywords,
        }
