"""Push: IMAP IDLE (RFC 2177) wakes a mailbox's cycle as soon as new mail arrives.

An `IdleSession` puts one logged-in connection in IDLE and lets the event loop watch its
socket (`loop.add_reader`): no thread waits while a thousand mailboxes idle, and a
stop takes effect at once (the socket is shut down), not after a timeout. imapclient
is blocking: only the short commands (IDLE, DONE) run in a thread; what the server sends
while idling is read with `idle_check(timeout=0)`, which never blocks.

Two ways to use it (`forwarder.worker`):

* `IdleWatcher`: a second connection of its own, reconnected with back-off after any
  error, IDLE renewed every `renew` seconds (29 minutes at most: servers may end an
  IDLE after 30), the cycle woken each time an IDLE is in place (for what came while
  nobody listened). A login refused for now (`ImapBusyError`: a connection limit) ends
  the watcher with `busy` set, and the worker idles on the cycle's own connection
  instead; refused credentials end it too (the cycle reports them).
* the cycle's own connection between two cycles (`FORWARDER_IMAP_CONNECTIONS=1`, or
  after such a refusal): IDLE after the cycle, DONE before the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from imapclient import IMAPClient

from forwarder.errors import AuthError, ImapBusyError, ImapError
from forwarder.imap_source import ImapSource
from forwarder.mailbox import ImapEndpoint

log = structlog.get_logger("forwarder.idle")
IDLE_RENEW = 29 * 60.0
FIRST_PERIOD = 1.0  # on the cycle's connection, the first IDLE after a cycle (see `done`)
NEW_MAIL = (b"EXISTS", b"RECENT")
MAX_BACKOFF = 60.0


def shutdown_socket(client: IMAPClient | None) -> None:
    """Shut the connection's socket down, from any thread: a read blocked on it returns at
    once (EOF). Through a duplicate descriptor: the socket object itself (and its TLS
    layer) is left to the thread that uses it."""
    if client is None:
        return
    with contextlib.suppress(Exception):  # already closed: nothing to cut
        fd = client.socket().fileno()
        if fd >= 0:
            with socket.socket(fileno=os.dup(fd)) as dup:
                dup.shutdown(socket.SHUT_RDWR)


def _peer_closed(client: IMAPClient) -> bool:
    """Readable but nothing to read: the server closed the connection (EOF)."""
    try:
        with socket.socket(fileno=os.dup(client.socket().fileno())) as dup:
            return dup.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class IdleSession:
    """One connection in IDLE, its socket watched by the event loop.

    `ended` completes (with the error as its result) when the connection fails or the
    server ends it; `on_new_mail` is called on each EXISTS or RECENT.
    """

    def __init__(self, client: IMAPClient, on_new_mail: Callable[[], None]) -> None:
        self.client = client
        self.on_new_mail = on_new_mail
        self._loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[Exception] = self._loop.create_future()
        self._fd: int | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self.client.idle)
        self._fd = self.client.socket().fileno()
        self._loop.add_reader(self._fd, self._readable)

    def _unwatch(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            self._loop.remove_reader(fd)

    def _end(self, error: Exception) -> None:
        self._unwatch()
        if not self.ended.done():
            self.ended.set_result(error)

    def _readable(self) -> None:
        try:
            responses = self.client.idle_check(timeout=0)
        except Exception as exc:
            self._end(exc)
            return
        if not responses and _peer_closed(self.client):
            self._end(ImapError("closed the connection during IDLE"))
            return
        new_mail = False
        for response in responses:
            if len(response) > 1 and response[1] in NEW_MAIL:
                new_mail = True
            elif response and response[0] == b"BYE":
                self._end(ImapError(f"ended the IDLE session ({_text(response)})"))
        if new_mail:
            self.on_new_mail()

    async def done(self) -> bool:
        """Leave IDLE (DONE): the connection can take commands again. Raises on failure.

        True when the responses read with it announce new mail: imaplib reads the socket
        through a buffer, so an EXISTS that came in one packet with the server's "+ idling"
        waits there, unseen by the event loop, until DONE reads it."""
        self._unwatch()
        if self.ended.done():
            raise self.ended.result()
        _, responses = await asyncio.to_thread(self.client.idle_done)
        new_mail = any(len(r) > 1 and r[1] in NEW_MAIL for r in responses)
        if new_mail:
            self.on_new_mail()
        return new_mail

    def cut(self) -> None:
        """Stop watching and shut the socket down (a stop: no DONE, no waiting)."""
        self._end(ImapError("stopped"))
        shutdown_socket(self.client)


def _text(response: tuple[object, ...]) -> str:
    parts = [p.decode(errors="replace") if isinstance(p, bytes) else str(p) for p in response]
    return " ".join(parts)


class IdleWatcher:
    """A second IMAP connection in IDLE that wakes the cycle; see the module docstring."""

    def __init__(
        self,
        endpoint: ImapEndpoint,
        wake: Callable[[], None],
        *,
        ca_file: Path | None = None,
        renew: float = IDLE_RENEW,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.on_error = on_error
        self.ca_file = ca_file
        self.wake = wake
        self.renew = min(renew, IDLE_RENEW)
        self.busy: ImapBusyError | None = None  # a second login was refused for now
        self.watching = False
        self._stop = asyncio.Event()
        self._source: ImapSource | None = None
        self._session: IdleSession | None = None

    def stop(self) -> None:
        """End at once: the connection is shut down, not logged out."""
        self._stop.set()
        if self._session is not None:
            self._session.cut()
        if self._source is not None:
            shutdown_socket(self._source.client)

    async def run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            source = self._source = ImapSource(self.endpoint, self.ca_file)
            try:
                await asyncio.to_thread(source.connect)
                if self._stop.is_set():
                    return
                if b"IDLE" not in source.capabilities:
                    log.info(
                        "idle_unavailable",
                        server=source.server,
                        fallback="polling every FORWARDER_POLL_INTERVAL",
                    )
                    return
                delay = 1.0
                await self._idle(source)
            except AuthError as exc:
                log.error("idle_failed", error=str(exc))  # the cycle reports it too
                return
            except ImapBusyError as exc:
                self.busy = exc  # the worker idles on the cycle's connection instead
                self.wake()
                return
            except Exception as exc:  # never let the watcher die: back-off and again
                if self._stop.is_set():
                    return
                if self.on_error is not None:
                    self.on_error()
                log.warning(
                    "idle_interrupted",
                    error=str(exc) or type(exc).__name__,
                    error_type=type(exc).__name__,
                    retry_in=delay,
                )
            finally:
                self.watching = False
                self._session = None
                source.drop()
                self._source = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, MAX_BACKOFF)

    async def _idle(self, source: ImapSource) -> None:
        client = source.client
        assert client is not None
        while not self._stop.is_set():
            session = self._session = IdleSession(client, self.wake)
            await session.start()
            if not self.watching:
                self.watching = True
                log.info("idle_started", server=source.server)
            # A cycle now, with the IDLE in place: it finds whatever came while nobody
            # listened, and what the server announced with its "+ idling", which imaplib's
            # buffer hides from the event loop. Not a DONE and a new IDLE instead: Dovecot
            # answers the new IDLE with the EXISTS of the mail that came meanwhile, in the
            # same packet as its "+ idling", where the buffer hides it again.
            self.wake()
            stop = asyncio.ensure_future(self._stop.wait())
            waits: list[asyncio.Future[Any]] = [session.ended, stop]
            try:
                await asyncio.wait(waits, timeout=self.renew, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
            if self._stop.is_set():
                return
            await session.done()  # raises what ended it, if anything did
