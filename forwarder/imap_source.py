"""The catch-all mailbox, over IMAP (imapclient, blocking: call it from a thread).

Reads with BODY.PEEK[] so that reading never sets \\Seen; marks with
`$Forwarded` and `\\Seen` only when told to. Every failure becomes an
`ImapError` that names the server and says what to do.
"""

from __future__ import annotations

import contextlib
import imaplib
import socket
import ssl
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import wraps
from typing import Any, ParamSpec, TypeVar

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError

from forwarder.config import Settings
from forwarder.errors import ImapAuthError, ImapError, KeywordsNotSupported
from forwarder.tls import tls_context

FORWARDED = b"$Forwarded"
FORWARD_FAILED = b"$ForwardFailed"
QUARANTINE = b"$ForwarderQuarantine"
SEEN = b"\\Seen"
_UID_CHUNK = 1000
PARTIAL_FETCH = 256 * 1024  # larger messages are read in parts of this size

P = ParamSpec("P")
R = TypeVar("R")


def _wrap_errors(method: Callable[P, R]) -> Callable[P, R]:
    """Turn socket, TLS and protocol failures into one ImapError naming the server."""

    @wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        self = args[0]
        assert isinstance(self, ImapSource)
        try:
            return method(*args, **kwargs)
        except ImapError:
            raise
        except (OSError, imaplib.IMAP4.error, IMAPClientError) as exc:
            self.drop()
            raise ImapError(f"{self.server}: {_describe(exc)}") from exc

    return wrapper


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate not trusted ({exc.verify_message}); set FORWARDER_TLS_CA_FILE "
            "for a private CA"
        )
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused; check FORWARDER_IMAP_HOST and FORWARDER_IMAP_PORT"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out; the server is unreachable or too slow"
    if isinstance(exc, socket.gaierror):
        return f"host name not found ({exc.strerror}); check FORWARDER_IMAP_HOST"
    text = str(exc) or type(exc).__name__
    return f"{text} ({type(exc).__name__})"


class ImapSource:
    """One IMAP connection to the catch-all folder."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server = f"IMAP server {settings.imap_host}:{settings.imap_port_effective}"
        self.client: IMAPClient | None = None
        self.uidvalidity: int = 0
        self.capabilities: frozenset[bytes] = frozenset()

    @property
    def mailbox_id(self) -> str:
        """Stable name of the selected mailbox; changes when UIDVALIDITY does."""
        s = self.settings
        return (
            f"{s.imap_username}@{s.imap_host}:{s.imap_port_effective}/{s.imap_folder}"
            f";UIDVALIDITY={self.uidvalidity}"
        )

    @property
    def connected(self) -> bool:
        return self.client is not None

    def _session(self) -> IMAPClient:
        if self.client is None:
            raise ImapError(f"{self.server}: the connection was lost; reconnecting next cycle")
        return self.client

    @_wrap_errors
    def connect(self) -> None:
        """Connect, log in and select the folder; checks that keywords can be stored."""
        s = self.settings
        context = tls_context(s, s.imap_security)
        client = IMAPClient(
            s.imap_host,
            port=s.imap_port_effective,
            ssl=s.imap_security == "tls",
            ssl_context=context,
            timeout=s.imap_timeout,
        )
        self.client = client
        if s.imap_security == "starttls":
            if b"PREAUTH" in (client.welcome or b"").upper()[:20]:
                raise ImapError(
                    f"{self.server}: greeted with PREAUTH, so STARTTLS cannot be "
                    "negotiated; refusing to go on without TLS"
                )
            if b"STARTTLS" not in client.capabilities():
                raise ImapError(
                    f"{self.server}: STARTTLS is not offered; refusing to log in "
                    "without TLS (use FORWARDER_IMAP_SECURITY=tls if it has IMAPS)"
                )
            client.starttls(context)
        try:
            client.login(s.imap_username, s.imap_password.get_secret_value())
        except LoginError:
            self.drop()
            raise ImapAuthError(
                f"{self.server} refused the login of {s.imap_username}; check "
                "FORWARDER_IMAP_USERNAME and FORWARDER_IMAP_PASSWORD"
            ) from None
        self.capabilities = frozenset(client.capabilities())
        self._select()

    def _select(self) -> None:
        assert self.client is not None
        folder = self.settings.imap_folder
        try:
            info = self.client.select_folder(folder)
        except IMAPClientError as exc:
            raise ImapError(
                f"{self.server}: cannot select folder {folder!r} ({exc}); check "
                "FORWARDER_IMAP_FOLDER"
            ) from None
        self.uidvalidity = int(info.get(b"UIDVALIDITY", 0))
        permanent = {bytes(f) for f in info.get(b"PERMANENTFLAGS", ())}
        if b"\\*" not in permanent and FORWARDED not in permanent:
            raise KeywordsNotSupported(
                f"{self.server}: folder {folder!r} does not accept the keyword $Forwarded "
                f"(PERMANENTFLAGS: {' '.join(sorted(f.decode() for f in permanent)) or 'none'}); "
                "the forwarder needs user keywords to remember what it forwarded"
            )

    @_wrap_errors
    def noop(self) -> None:
        self._session().noop()

    @_wrap_errors
    def unforwarded_uids(self) -> list[int]:
        """UIDs of the messages without `$Forwarded` nor `$ForwarderQuarantine`, oldest first."""
        client = self._session()
        criteria = ["UNKEYWORD", FORWARDED.decode(), "UNKEYWORD", QUARANTINE.decode()]
        return sorted(int(u) for u in client.search(criteria))

    @_wrap_errors
    def sizes(self, uids: Sequence[int]) -> dict[int, int]:
        client = self._session()
        found: dict[int, int] = {}
        for chunk in _chunks(uids, _UID_CHUNK):
            for uid, data in client.fetch(chunk, ["RFC822.SIZE"]).items():
                found[int(uid)] = int(data.get(b"RFC822.SIZE", 0))
        return found

    @_wrap_errors
    def fetch(self, uids: Sequence[int], sizes: Mapping[int, int]) -> dict[int, bytes]:
        """Raw bytes of these messages, read with BODY.PEEK[] (no \\Seen).

        A large message is read in partial fetches into one buffer: a whole-message
        FETCH costs about three times its size while the response is parsed.
        """
        client = self._session()
        small = [uid for uid in uids if sizes.get(uid, 0) <= PARTIAL_FETCH]
        found: dict[int, bytes] = {}
        if small:
            for uid, data in client.fetch(small, ["BODY.PEEK[]"]).items():
                raw = data.get(b"BODY[]")
                if isinstance(raw, bytes):
                    found[int(uid)] = raw
        for uid in uids:
            if sizes.get(uid, 0) > PARTIAL_FETCH:
                raw = self._fetch_in_parts(client, uid, sizes[uid])
                if raw is not None:
                    found[uid] = raw
        return found

    def _fetch_in_parts(self, client: IMAPClient, uid: int, size: int) -> bytes | None:
        buffer = bytearray(size)  # allocated once: growing it would copy it
        offset = 0
        while True:
            item = f"BODY.PEEK[]<{offset}.{PARTIAL_FETCH}>"
            data = client.fetch([uid], [item]).get(uid)
            if data is None:
                return None  # expunged meanwhile
            part = data.get(f"BODY[]<{offset}>".encode())
            if not isinstance(part, bytes):
                return None
            buffer[offset : offset + len(part)] = part
            offset += len(part)
            if len(part) < PARTIAL_FETCH:
                del buffer[offset:]  # the server's size was an estimate
                # bytes(buffer) would copy it: hand the buffer itself on (bytes-like).
                return buffer  # type: ignore[return-value]

    @_wrap_errors
    def mark(self, uids: Iterable[int], flags: Sequence[bytes]) -> None:
        client = self._session()
        uid_list = sorted(uids)
        if uid_list:
            for chunk in _chunks(uid_list, _UID_CHUNK):
                client.add_flags(chunk, list(flags), silent=True)

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
        }


def _chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
