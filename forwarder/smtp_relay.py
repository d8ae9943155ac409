"""Re-sending over SMTP (aiosmtplib): one transaction per message, per-recipient results.

The relay reports what the server answered for each recipient; it decides
nothing about retries. Connection-level failures raise `SmtpError`: the caller
records nothing for that message and tries again on the next cycle.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPException,
    SMTPRecipientRefused,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
)

from forwarder.errors import SmtpAuthError, SmtpError
from forwarder.mailbox import SmtpEndpoint
from forwarder.tls import tls_context
from forwarder.wire import PIECE, data_pieces

CONNECT_TIMEOUT = 60.0  # RFC 5321 4.5.3.2: 5 minutes for most commands; connecting is quicker


@dataclass(frozen=True)
class Reply:
    """The server's answer for one recipient: the RCPT reply if refused, else the DATA reply."""

    code: int
    text: str

    @property
    def accepted(self) -> bool:
        return 200 <= self.code < 300

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500


class SmtpRelay:
    """One reused SMTP connection to the submission server."""

    def __init__(self, endpoint: SmtpEndpoint, ca_file: Path | None = None) -> None:
        self.endpoint = endpoint
        self.ca_file = ca_file
        self.server = endpoint.server
        self._smtp: aiosmtplib.SMTP | None = None

    @property
    def connected(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected

    async def connect(self) -> None:
        s = self.endpoint
        smtp = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            use_tls=s.security == "tls",
            start_tls=False,  # done below, so that a missing STARTTLS gets a clear error
            tls_context=tls_context(self.ca_file, s.security),
            timeout=CONNECT_TIMEOUT,
        )
        try:
            await smtp.connect()
            await smtp.ehlo()  # now: SIZE, 8BITMIME and STARTTLS are known before MAIL
            if s.security == "starttls":
                if not smtp.supports_extension("starttls"):
                    smtp.close()
                    raise SmtpError(
                        f"{self.server}: STARTTLS is not offered; refusing to send without TLS "
                        "(use FORWARDER_SMTP_SECURITY=tls if it has SMTPS on port 465)"
                    )
                await smtp.starttls()
                await smtp.ehlo()
            if s.username:
                password = s.password.get_secret_value() if s.password else ""
                await smtp.login(s.username, password)
        except SmtpError:
            raise
        except SMTPAuthenticationError as exc:
            smtp.close()
            raise SmtpAuthError(
                f"{self.server} refused the login of {s.username} ({exc.code}); check "
                "FORWARDER_SMTP_USERNAME and FORWARDER_SMTP_PASSWORD"
            ) from None
        except (TimeoutError, SMTPException, OSError) as exc:
            smtp.close()
            raise SmtpError(f"{self.server}: {_describe(exc)}") from None
        self._smtp = smtp

    async def send(
        self, mail_from: str, recipients: Sequence[str], prefix: bytes, raw: bytes
    ) -> dict[str, Reply]:
        """One transaction. Returns each recipient's reply; raises SmtpError if the link fails.

        One deadline (FORWARDER_SMTP_TIMEOUT, default 600 s: RFC 5321 4.5.3.2's 10 minutes
        for the final reply) covers the whole transaction: a timer per command would cost
        a task per command.
        """
        try:
            async with asyncio.timeout(self.endpoint.timeout):
                return await self._transaction(mail_from, recipients, prefix, raw)
        except SmtpError:
            self.drop()
            raise
        except TimeoutError:
            self.drop()
            raise SmtpError(
                f"{self.server}: no reply within {self.endpoint.timeout:g} s "
                "(FORWARDER_SMTP_TIMEOUT); the message will be sent again"
            ) from None
        except (SMTPException, OSError) as exc:
            self.drop()
            raise SmtpError(f"{self.server}: {_describe(exc)}") from None

    async def _transaction(
        self, mail_from: str, recipients: Sequence[str], prefix: bytes, raw: bytes
    ) -> dict[str, Reply]:
        refused = await self._mail(mail_from, recipients, prefix, raw)
        if refused is not None:
            return refused
        smtp = self._smtp
        assert smtp is not None
        replies: dict[str, Reply] = {}
        for rcpt in recipients:
            try:
                await smtp.rcpt(rcpt, timeout=None)
            except SMTPRecipientRefused as exc:
                replies[rcpt] = Reply(exc.code, exc.message)
        accepted = [r for r in recipients if r not in replies]
        if not accepted:
            await self._reset()
            return replies
        final = await self._data(smtp, prefix, raw)
        replies.update(dict.fromkeys(accepted, final))
        return replies

    async def _data(self, smtp: aiosmtplib.SMTP, prefix: bytes, raw: bytes) -> Reply:
        """DATA, streamed: pieces are written as the socket drains, never a whole copy."""
        response = await smtp.execute_command(b"DATA", timeout=None)
        if response.code != 354:
            return Reply(response.code, response.message)
        protocol = smtp.protocol
        assert protocol is not None
        if len(prefix) + len(raw) <= PIECE:
            protocol.write(b"".join(data_pieces(prefix, raw)))  # small: one write, dot included
        else:
            drain = getattr(protocol, "_drain_helper", None)  # aiosmtplib's flow control
            for piece in data_pieces(prefix, raw):
                protocol.write(piece)
                if piece == b".\r\n":
                    break  # read the reply at once: no await between the dot and the read
                if drain is not None:
                    await drain()
        response = await protocol.read_response(timeout=None)
        return Reply(response.code, response.message)

    async def _mail(
        self, mail_from: str, recipients: Sequence[str], prefix: bytes, raw: bytes
    ) -> dict[str, Reply] | None:
        """MAIL FROM, on a fresh connection if the reused one went stale (nothing sent yet).

        Returns replies for every recipient when the transaction cannot start for this
        message (too large, or refused with 4xx/552); None when it may go on.
        """
        for attempt in (1, 2):
            if not self.connected:
                await self.connect()
            smtp = self._smtp
            assert smtp is not None
            limit = _size_limit(smtp)
            size = len(prefix) + len(raw)
            if limit and size > limit:
                text = f"message size {size} exceeds the server's limit of {limit}"
                return dict.fromkeys(recipients, Reply(552, text))
            try:
                await smtp.mail(
                    mail_from,
                    options=_mail_options(smtp, size, raw.isascii()),
                    timeout=None,  # under the transaction's deadline
                )
                return None
            except SMTPServerDisconnected:
                self.drop()
                if attempt == 2:
                    raise
            except SMTPSenderRefused as exc:
                await self._reset()
                if 400 <= exc.code < 500 or exc.code == 552:
                    return dict.fromkeys(recipients, Reply(exc.code, exc.message))
                raise SmtpError(
                    f"{self.server} refused the envelope sender {mail_from} ({exc.code} "
                    f"{exc.message}); check FORWARDER_ENVELOPE_SENDER"
                ) from None
        raise AssertionError("unreachable")

    async def _reset(self) -> None:
        if self._smtp is not None and self._smtp.is_connected:
            try:
                await self._smtp.rset()
            except (SMTPException, OSError):
                self.drop()

    def drop(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None and smtp.is_connected:
            try:
                await smtp.quit(timeout=10)
            except (TimeoutError, SMTPException, OSError):
                smtp.close()

    def describe_capabilities(self) -> dict[str, object]:
        smtp = self._smtp
        if smtp is None:
            return {}
        return {
            "size_limit": _size_limit(smtp),
            "8bitmime": smtp.supports_extension("8bitmime"),
            "smtputf8": smtp.supports_extension("smtputf8"),
        }


class SmtpPool:
    """A few reused connections, so that several transactions are in flight at once."""

    def __init__(self, endpoint: SmtpEndpoint, ca_file: Path | None = None) -> None:
        self.relays = [SmtpRelay(endpoint, ca_file) for _ in range(endpoint.connections)]
        self.server = self.relays[0].server
        self._idle: asyncio.Queue[SmtpRelay] = asyncio.Queue()
        for relay in self.relays:
            self._idle.put_nowait(relay)

    @property
    def connected(self) -> bool:
        return any(relay.connected for relay in self.relays)

    async def connect(self) -> None:
        """Open one connection (login checked); the others open when first needed."""
        if not self.connected:
            await self.relays[0].connect()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[SmtpRelay]:
        relay = await self._idle.get()
        try:
            yield relay
        finally:
            self._idle.put_nowait(relay)

    async def close(self) -> None:
        for relay in self.relays:
            await relay.close()

    def describe_capabilities(self) -> dict[str, object]:
        return self.relays[0].describe_capabilities()


def _size_limit(smtp: aiosmtplib.SMTP) -> int:
    value = smtp.esmtp_extensions.get("size", "")
    return int(value) if value.strip().isdigit() else 0


def _mail_options(smtp: aiosmtplib.SMTP, size: int, ascii_only: bool) -> list[str]:
    options: list[str] = []
    if smtp.supports_extension("size"):
        options.append(f"SIZE={size}")
    if not ascii_only:
        if smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if smtp.supports_extension("smtputf8"):
            options.append("SMTPUTF8")
    return options


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused; check FORWARDER_SMTP_HOST and FORWARDER_SMTP_PORT"
    if isinstance(exc, SMTPResponseException):
        return f"{exc.code} {exc.message}"
    text = str(exc) or type(exc).__name__
    if "certificate verify failed" in text.lower():
        return f"TLS certificate not trusted ({text}); set FORWARDER_TLS_CA_FILE for a private CA"
    return text
