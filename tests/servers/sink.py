"""The aiosmtpd SMTP sink on a free loopback port, and its fixtures.

:class:`SmtpSink` records every transaction, with hooks to refuse recipients,
MAIL or DATA, to delay replies, to drop connections, and TLS (STARTTLS or
implicit) with a self-signed certificate.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import (
    DATA_SIZE_DEFAULT,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
)

from tests.servers.common import LOOPBACK, Server, self_signed_certificate

__all__ = ["Received", "SinkTls", "SmtpSink", "smtp_sink", "starttls_sink"]


@dataclass
class Received:
    """One SMTP transaction accepted by :class:`SmtpSink`."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str] = field(default_factory=list)
    auth_login: str | None = None
    tls: bool = False  # the transaction went over TLS (STARTTLS or implicit)


SinkTls = Literal["starttls", "implicit"]


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def _command(self, name: str) -> None:
        """Log the command, then wait for the delay configured for it, if any."""
        self.sink._log_command(name)
        delay = self.sink.delay.get(name, 0.0)
        if delay > 0:
            await asyncio.sleep(delay)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        await self._command("EHLO")
        session.host_name = hostname  # aiosmtpd leaves this to a 5-argument EHLO hook
        hidden = {name.upper() for name in self.sink.hidden_extensions}
        if not self.sink.offer_starttls:
            hidden.add("STARTTLS")
        return [r for r in responses if (r[4:].upper().split() or [""])[0] not in hidden]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        await self._command("MAIL")
        if self.sink.auth is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        if self.sink.mail_response is not None:
            return self.sink.mail_response
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        await self._command("RCPT")
        responses = self.sink.rcpt_responses
        override = responses.get(address) or responses.get(address.lower())
        if override is not None:
            return override
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await self._command("DATA")
        if self.sink.data_response is not None:
            return self.sink.data_response
        assert envelope.mail_from is not None and envelope.original_content is not None
        assert server.transport is not None
        received = Received(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content),
            mail_options=list(envelope.mail_options),
            auth_login=session.auth_data if session.authenticated else None,
            tls=server.transport.get_extra_info("ssl_object") is not None,
        )
        if self.sink._take_disconnect(received):
            # abort(): the transport drops what is written from now on, so the
            # reply aiosmtpd pushes after this hook never reaches the client.
            cast(asyncio.Transport, server.transport).abort()
            return "250 OK (never sent)"
        self.sink._record(received)
        return "250 OK"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await self._command("RSET")
        return "250 OK"

    async def handle_NOOP(
        self, server: SMTP, session: Session, envelope: Envelope, arg: str
    ) -> str:
        await self._command("NOOP")
        return "250 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await self._command("QUIT")
        return "221 Bye"


class _SinkSMTP(SMTP):
    """aiosmtpd's SMTP with the sink's line length limit, registering its connections."""

    def __init__(self, handler: _Handler, *, sink: SmtpSink, **kwargs: Any) -> None:
        self.line_length_limit = sink.max_line_length  # read by SMTP.__init__
        self._sink = sink
        super().__init__(handler, **kwargs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._sink._opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            self._sink._closed(self)


class _PortZeroController(Controller):
    """aiosmtpd's Controller binding port 0 (no race) and reading back the real port."""

    def _create_server(self) -> Any:
        async def bind() -> Any:
            server = await self.loop.create_server(
                self._factory_invoker, host=self.hostname, port=self.port, ssl=self.ssl_context
            )
            self.port = server.sockets[0].getsockname()[1]
            return server

        return bind()


class _SinkController(_PortZeroController):
    """Builds each connection's SMTP from the sink's settings at that moment."""

    def __init__(self, sink: SmtpSink, **kwargs: Any) -> None:
        self.sink = sink
        super().__init__(_Handler(sink), **kwargs)

    def factory(self) -> SMTP:
        sink = self.sink
        kwargs = dict(self.SMTP_kwargs)
        kwargs["data_size_limit"] = sink.size_limit
        if sink.tls == "starttls":
            kwargs.update(tls_context=sink._server_context, require_starttls=sink.require_starttls)
        return _SinkSMTP(self.handler, sink=sink, **kwargs)


class SmtpSink(Server):
    """An aiosmtpd server on a free loopback port that records every transaction.

    ``Received.data`` are the exact bytes of the DATA section after
    dot-unstuffing (aiosmtpd's ``envelope.original_content``, no decoding):
    CRLF line endings are preserved as sent, a bare LF stays a bare LF, and
    the CRLF before the final ``.`` belongs to the data.  Note that Python's
    ``smtplib`` appends a CRLF when the message does not end with one, so
    ``data`` is then ``raw + b"\\r\\n"``.

    SMTPUTF8 and 8BITMIME are advertised (``enable_SMTPUTF8=True``), and
    ``SIZE <size_limit>`` unless ``size_limit`` is None or 0; a larger DATA is
    refused with 552.  A data line longer than ``max_line_length`` (aiosmtpd's
    1001 by default, as RFC 5321 allows) is refused with 500; raise it to
    record whatever a client sends.  With ``auth=(username, password)`` AUTH
    PLAIN/LOGIN is offered (without TLS too) and required before MAIL; both are
    UTF-8 (RFC 4616); ``auth_exclude=("PLAIN",)`` leaves a mechanism out.

    TLS, with a fresh self-signed certificate for localhost/127.0.0.1 whose
    file is ``ca_file``: ``tls="starttls"`` offers STARTTLS (``require_starttls``
    refuses every other command before it, with 530); ``offer_starttls=False``
    then leaves STARTTLS out of the EHLO reply, like a downgrading middlebox,
    although the server could do it; ``tls="implicit"`` speaks TLS from the
    first byte (SMTPS).  ``Received.tls`` tells whether a transaction was
    encrypted.

    Fault injection, changeable at any time from the test thread (the size
    and line limits and the TLS options apply to connections opened later):

    * ``hidden_extensions`` (e.g. ``{"8BITMIME", "SMTPUTF8"}``) leaves those
      keywords out of the EHLO reply, as an older server would.
    * ``rcpt_responses`` maps a recipient address to the reply for its RCPT
      (e.g. ``"550 5.1.1 no such user"``); ``mail_response`` replaces the reply
      to MAIL FROM and ``data_response`` the reply after DATA (e.g.
      ``"451 4.3.0 try later"``); such transactions are not recorded.
    * ``disconnect_after_data = n``: for the next ``n`` transactions, the server
      receives the whole DATA, then drops the connection without replying.
      Those transactions are recorded in ``received_then_dropped`` (the server
      did get the bytes), not in ``received``.
    * ``delay`` maps a command name (``EHLO``, ``MAIL``, ``RCPT``, ``DATA``,
      ``RSET``, ``NOOP``, ``QUIT``) to seconds to wait before replying to it; for
      DATA the wait starts once the whole message is in.  A client that gives
      up meanwhile closes the connection and the transaction is dropped.
    * ``drop_connections()`` closes every open connection at once.

    ``commands`` lists the name of every command the sink answered, in order
    (not STARTTLS and AUTH, which aiosmtpd handles itself).

    ``stop()`` then ``start()`` rebinds the same port.
    """

    host: str = LOOPBACK

    def __init__(
        self,
        auth: tuple[str, str] | None = None,
        *,
        auth_exclude: tuple[str, ...] = (),
        tls: SinkTls | None = None,
        offer_starttls: bool = True,
        require_starttls: bool = False,
        size_limit: int | None = DATA_SIZE_DEFAULT,
        max_line_length: int = SMTP.line_length_limit,
    ) -> None:
        self.auth = auth
        self.auth_exclude = auth_exclude
        self.tls = tls
        self.offer_starttls = offer_starttls
        self.require_starttls = require_starttls
        self.size_limit = size_limit
        self.max_line_length = max_line_length
        self.port = 0
        self.received: list[Received] = []
        self.received_then_dropped: list[Received] = []
        self.commands: list[str] = []
        self.rcpt_responses: dict[str, str] = {}
        self.hidden_extensions: set[str] = set()
        self.mail_response: str | None = None
        self.data_response: str | None = None
        self.disconnect_after_data = 0
        self.delay: dict[str, float] = {}
        self.ca_file: Path | None = None
        self._cert_dir: Path | None = None
        self._server_context: ssl.SSLContext | None = None
        self._changed = threading.Condition()
        self._sessions: set[_SinkSMTP] = set()
        self._controller: _SinkController | None = None
        if tls is not None:
            self._cert_dir = Path(tempfile.mkdtemp(prefix="smtp-sink-"))
            cert, key = self_signed_certificate(self._cert_dir, self.host)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(cert, key)
            self.ca_file, self._server_context = cert, context

    @property
    def running(self) -> bool:
        return self._controller is not None

    def start(self) -> None:
        if self._controller is not None:
            raise RuntimeError("SmtpSink already running")
        kwargs: dict[str, Any] = {}
        if self.auth is not None:
            # auth_required=True would warn about plaintext AUTH; handle_MAIL enforces it.
            kwargs.update(
                authenticator=self._authenticate,
                auth_require_tls=False,
                auth_exclude_mechanism=self.auth_exclude,
            )
        if self.tls == "implicit":
            kwargs["ssl_context"] = self._server_context
        controller = _SinkController(
            self,
            hostname=self.host,
            port=self.port,
            decode_data=False,
            enable_SMTPUTF8=True,
            **kwargs,
        )
        controller.start()
        self.port = controller.port
        self._controller = controller

    def stop(self) -> None:
        """Close every connection, then stop listening."""
        controller, self._controller = self._controller, None
        if controller is not None:
            try:
                self._drop_connections(controller)
            finally:
                controller.stop()

    def close(self) -> None:
        """Stop, and remove the certificate if there is one."""
        self.stop()
        if self._cert_dir is not None:
            shutil.rmtree(self._cert_dir, ignore_errors=True)
            self._cert_dir = None

    def drop_connections(self, timeout: float = 5.0) -> None:
        """Close every open connection now (without a reply); return once they are gone."""
        if self._controller is None:
            raise RuntimeError("SmtpSink not running")
        self._drop_connections(self._controller, timeout)

    def clear(self) -> None:
        """Forget received transactions, commands and fault injections."""
        with self._changed:
            self.received.clear()
            self.received_then_dropped.clear()
            self.commands.clear()
            self.disconnect_after_data = 0
        self.rcpt_responses.clear()
        self.hidden_extensions.clear()
        self.mail_response = None
        self.data_response = None
        self.delay.clear()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:
        """Wait until at least ``n`` transactions were received; return a copy of them."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.received) >= n, timeout):
                raise TimeoutError(
                    f"expected {n} transaction(s) within {timeout} s, got "
                    f"{len(self.received)}: {self.received!r}"
                )
            return list(self.received)

    def wait_for_command(self, name: str, timeout: float = 10.0) -> None:
        """Wait until a client has sent the command `name` (as in `commands`)."""
        with self._changed:
            if not self._changed.wait_for(lambda: name in self.commands, timeout):
                raise TimeoutError(f"no {name} command within {timeout} s: {self.commands!r}")

    @property
    def open_connections(self) -> int:
        with self._changed:
            return len(self._sessions)

    # ---------------------------------------------------------------- internals

    def _drop_connections(self, controller: _SinkController, timeout: float = 5.0) -> None:
        def abort_all() -> None:
            for session in list(self._sessions):
                if session.transport is not None:
                    cast(asyncio.Transport, session.transport).abort()

        controller.loop.call_soon_threadsafe(abort_all)
        with self._changed:
            if not self._changed.wait_for(lambda: not self._sessions, timeout):
                raise TimeoutError(f"{len(self._sessions)} SMTP connection(s) did not close")

    def _opened(self, session: _SinkSMTP) -> None:
        with self._changed:
            self._sessions.add(session)  # again after STARTTLS: a set
            self._changed.notify_all()

    def _closed(self, session: _SinkSMTP) -> None:
        with self._changed:
            self._sessions.discard(session)
            self._changed.notify_all()

    def _log_command(self, name: str) -> None:
        with self._changed:
            self.commands.append(name)
            self._changed.notify_all()

    def _take_disconnect(self, received: Received) -> bool:
        with self._changed:
            if self.disconnect_after_data <= 0:
                return False
            self.disconnect_after_data -= 1
            self.received_then_dropped.append(received)
            self._changed.notify_all()
            return True

    def _record(self, received: Received) -> None:
        with self._changed:
            self.received.append(received)
            self._changed.notify_all()

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        assert self.auth is not None
        if isinstance(auth_data, LoginPassword):
            login, password = auth_data.login.decode(), auth_data.password.decode()
            if (login, password) == self.auth:
                return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A fresh SmtpSink per test (starting one takes a few milliseconds)."""
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def starttls_sink() -> Iterator[SmtpSink]:
    """An SmtpSink offering STARTTLS with a self-signed certificate (``ca_file``)."""
    with SmtpSink(tls="starttls") as sink:
        yield sink
