"""IMAP-aware faults in front of a real Dovecot: what providers and other servers do.

:class:`ImapFaultProxy` is a :class:`tests.faults.FaultProxy` that reads the IMAP
lines going through it (literals are passed on untouched) and, as set from the
test thread at any time:

* ``hide_keywords = True``: removes ``\\*`` and every keyword from
  ``PERMANENTFLAGS`` and keywords from ``FLAGS`` (a folder without user keywords:
  Exchange, Courier with ``IMAP_KEYWORDS=0``);
* ``keyword_store = "no" | "bad" | "forget"``: a STORE naming a keyword is answered
  ``NO [CANNOT]`` or ``BAD`` by the proxy without reaching the server (as Courier
  does: the ``\\Seen`` of the same STORE is lost too), or passed on without its
  keywords, so that the server answers OK with FLAGS that lack them;
* ``hide_capabilities = {b"AUTH=PLAIN"}``: those capabilities are left out of
  every CAPABILITY response and response code (a server offering LOGIN only);
* ``max_logins = n``: a LOGIN/AUTHENTICATE while ``n`` sessions through the proxy
  are logged in is refused the way ``refusal`` says: ``"limit"`` (``NO [LIMIT]``),
  ``"unavailable"`` (``NO [UNAVAILABLE]``), ``"wording"`` (a plain NO saying "Too many
  simultaneous connections", as Gmail does), ``"bye"`` (``* BYE`` instead of the
  reply, then the connection is closed) or ``"greeting"`` (a new connection is
  greeted with ``* BYE`` and closed, before any command).

The ``other_session`` fixture holds one session through the proxy, as another
client of the account would. ``logins`` and ``refused_logins`` count what
happened; ``refusal_seen`` (a ``threading.Event``) is set at each refusal. The
``imap_faults`` fixture puts one in front of the ``mailbox`` Dovecot.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import pytest
from imapclient import IMAPClient

from tests.faults import FaultProxy, Side, _Link
from tests.servers import MailServer

__all__ = ["ImapFaultProxy", "imap_faults", "other_session"]

KeywordStore = Literal["pass", "no", "bad", "forget"]
Refusal = Literal["limit", "unavailable", "wording", "bye", "greeting"]
_COMMAND = re.compile(rb"^(\S+) +(?:UID +)?([A-Za-z]+)", re.IGNORECASE)
_STORE = re.compile(
    rb"^(?P<head>\S+ +(?:UID +)?STORE +\S+ +[+-]?FLAGS(?:\.SILENT)? *)\((?P<flags>[^)]*)\)"
    rb"(?P<tail>\r?\n)$",
    re.IGNORECASE,
)
_LITERAL = re.compile(rb"\{(\d+)(\+?)\}\r\n$")
_PERMANENTFLAGS = re.compile(rb"\[PERMANENTFLAGS \(([^)]*)\)\]", re.IGNORECASE)
_FLAGS = re.compile(rb"^\* FLAGS \(([^)]*)\)", re.IGNORECASE)
_CAPABILITY = re.compile(rb"(^\* CAPABILITY |\[CAPABILITY )([^\]\r\n]*)", re.IGNORECASE)
_REFUSALS: dict[str, bytes] = {
    "limit": b"NO [LIMIT] Too many connections for this account",
    "unavailable": b"NO [UNAVAILABLE] Temporary authentication failure.",
    "wording": b"NO Too many simultaneous connections. (Failure)",
}
BYE = b"* BYE Too many connections from your IP address.\r\n"


@dataclass(eq=False)
class _Session:
    login_tag: bytes | None = None
    logged_in: bool = False


class ImapFaultProxy(FaultProxy):
    """A FaultProxy that understands enough IMAP to play a picky server."""

    def __init__(self, target_host: str, target_port: int, *, record: bool = False) -> None:
        super().__init__(target_host, target_port, record=record)
        self.hide_keywords = False
        self.hide_capabilities: set[bytes] = set()
        self.keyword_store: KeywordStore = "pass"
        self.max_logins: int | None = None
        self.refusal: Refusal = "limit"
        self.logins = 0
        self.refused_logins = 0
        self.refusal_seen = threading.Event()
        self._sessions: dict[_Link, _Session] = {}

    def _logged_in(self) -> int:
        return sum(1 for link, s in self._sessions.items() if s.logged_in and link in self._links)

    def _refused(self) -> None:
        self.refused_logins += 1
        self.refusal_seen.set()

    def _full(self) -> bool:
        return self.max_logins is not None and self._logged_in() >= self.max_logins

    async def _relay(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self.refusal == "greeting" and self._full():
            self._refused()
            writer.write(BYE)
            await writer.drain()
            return
        try:
            up_reader, link.server = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            return
        session = self._sessions.setdefault(link, _Session())
        try:
            await asyncio.gather(
                self._commands(link, session, reader, link.server),
                self._responses(link, session, up_reader, writer),
            )
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._sessions.pop(link, None)

    # ---------------------------------------------------------------- client -> server

    async def _commands(
        self,
        link: _Link,
        session: _Session,
        reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
    ) -> None:
        while line := await _read_line(reader):
            answer, line = self._command(session, line)
            if answer is not None:
                self._write(link.client, "server", answer)
                await link.client.drain()
                if answer.startswith(b"* BYE"):
                    link.abort()
                    return
                while (literal := _LITERAL.search(line)) and literal.group(2):  # LITERAL+
                    await reader.readexactly(int(literal.group(1)))
                    line = await _read_line(reader)
                continue
            await self._pass(upstream, "client", line)
            while literal := _LITERAL.search(line):
                await self._pass(upstream, "client", await reader.readexactly(int(literal[1])))
                line = await _read_line(reader)
                await self._pass(upstream, "client", line)
        if upstream.can_write_eof() and not upstream.transport.is_closing():
            upstream.write_eof()

    def _command(self, session: _Session, line: bytes) -> tuple[bytes | None, bytes]:
        """(an answer of the proxy's own, or None) and the line to pass on."""
        command = _COMMAND.match(line)
        if command is None:
            return None, line
        tag, name = command[1], command[2].upper()
        if name in (b"LOGIN", b"AUTHENTICATE"):
            if self._full():
                self._refused()
                if self.refusal in ("bye", "greeting"):
                    return BYE, line
                return tag + b" " + _REFUSALS[self.refusal] + b"\r\n", line
            session.login_tag = tag
            return None, line
        store = _STORE.match(line)
        if name != b"STORE" or store is None or self.keyword_store == "pass":
            return None, line
        flags = store["flags"].split()
        system = [f for f in flags if f.startswith(b"\\")]
        if len(system) == len(flags):
            return None, line
        if self.keyword_store == "no":
            return tag + b" NO [CANNOT] Keywords are not supported in this mailbox\r\n", line
        if self.keyword_store == "bad":
            return tag + b" BAD Error in IMAP command received by server.\r\n", line
        return None, store["head"] + b"(" + b" ".join(system) + b")" + store["tail"]

    # ---------------------------------------------------------------- server -> client

    async def _responses(
        self,
        link: _Link,
        session: _Session,
        reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
    ) -> None:
        while line := await _read_line(reader):
            await self._pass(client, "server", self._response(session, line))
            while literal := _LITERAL.search(line):
                await self._pass(client, "server", await reader.readexactly(int(literal[1])))
                line = await _read_line(reader)
                await self._pass(client, "server", line)
        link.abort()

    def _response(self, session: _Session, line: bytes) -> bytes:
        if session.login_tag and line.startswith(session.login_tag + b" "):
            if line[len(session.login_tag) + 1 :].upper().startswith(b"OK"):
                session.logged_in = True
                self.logins += 1
            session.login_tag = None
        if self.hide_capabilities:
            line = _CAPABILITY.sub(lambda m: m[1] + self._capabilities(m[2]), line)
        if self.hide_keywords:
            line = _PERMANENTFLAGS.sub(lambda m: b"[PERMANENTFLAGS (%s)]" % _system(m[1]), line)
            line = _FLAGS.sub(lambda m: b"* FLAGS (%s)" % _system(m[1]), line)
        return line

    def _capabilities(self, atoms: bytes) -> bytes:
        hidden = {c.upper() for c in self.hide_capabilities}
        return b" ".join(a for a in atoms.split(b" ") if a.upper() not in hidden)

    async def _pass(self, writer: asyncio.StreamWriter, side: Side, data: bytes) -> None:
        self._write(writer, side, data)
        await writer.drain()


def _system(flags: bytes) -> bytes:
    """Only the system flags of a flag list, without `\\*`."""
    return b" ".join(f for f in flags.split() if f.startswith(b"\\") and f != b"\\*")


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    """One line up to LF, however long (a SEARCH answer can be megabytes); b"" at EOF."""
    parts: list[bytes] = []
    while True:
        try:
            parts.append(await reader.readuntil(b"\n"))
            return b"".join(parts)
        except asyncio.LimitOverrunError as overrun:
            parts.append(await reader.readexactly(overrun.consumed))
        except asyncio.IncompleteReadError as eof:
            parts.append(eof.partial)
            return b"".join(parts)


@pytest.fixture
def other_session(imap_faults: ImapFaultProxy, mailbox: MailServer) -> Iterator[threading.Event]:
    """Another client of the account, logged in through ``imap_faults`` until the returned
    event is set (or the test ends)."""
    release, logged_in = threading.Event(), threading.Event()

    def hold() -> None:
        with IMAPClient(imap_faults.host, port=imap_faults.port, ssl=False, timeout=10) as c:
            c.login(mailbox.username, mailbox.password)
            logged_in.set()
            release.wait()
            c.logout()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert logged_in.wait(10)
    yield release
    release.set()
    thread.join(10)


@pytest.fixture
def imap_faults(mailbox: MailServer) -> Iterator[ImapFaultProxy]:
    """A started ImapFaultProxy in front of the ``mailbox`` Dovecot's IMAP port."""
    with ImapFaultProxy(mailbox.host, mailbox.imap_port) as proxy:
        yield proxy
