"""Re-sending over SMTP (aiosmtplib): one transaction per message, per-recipient results.

The relay reports what the server answered for each recipient; it decides
nothing about retries. Connection-level failures raise `SmtpError`, and a
refusal of the forwarder itself (its envelope sender, login or relay
permission, given to every recipient) raises `SubmissionRefused`: the caller
records nothing for that message and tries again on the next cycle.

A failure after the final dot of DATA is different: the server has the whole
message and may have delivered it. `send` then returns `replies.no_reply` (code
None, "outcome unknown") for the recipients it accepted, instead of raising, so
that the caller counts an attempt rather than sending again at once; the
connection is dropped and the next transaction opens a new one. Before the
final dot nothing can have been delivered, and `SmtpError` is raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtplib import SMTPException, SMTPServerDisconnected

from forwarder.errors import SmtpError, SubmissionRefused
from forwarder.esmtp import (
    EIGHT_BIT_REFUSED,
    NON_ASCII_REFUSED,
    eight_bit_refused,
    mail_options,
    path,
    size_limit,
    utf8_envelope,
)
from forwarder.mailbox import SmtpEndpoint
from forwarder.replies import Reply, ReplyCode, about_the_message, no_reply
from forwarder.smtp_errors import submission_refused, transaction_error
from forwarder.smtp_session import CONNECT_TIMEOUT, open_session
from forwarder.wire import PIECE, data_pieces

__all__ = ["Reply", "SmtpRelay"]


@dataclass
class _Progress:
    """How far one transaction got: the replies of the refused recipients, the accepted
    ones, and whether the final dot was written (from then on the outcome is unknown)."""

    refused: dict[str, Reply] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)
    dot_written: bool = False


class SmtpRelay:
    """One reused SMTP connection to the submission server."""

    def __init__(self, endpoint: SmtpEndpoint, ca_file: Path | None = None) -> None:
        self.endpoint = endpoint
        self.ca_file = ca_file
        self.server = endpoint.server
        # FORWARDER_SMTP_TIMEOUT bounds connecting and each command before MAIL too.
        self.connect_timeout = min(CONNECT_TIMEOUT, endpoint.timeout)
        self.ehlo_name = ""
        self._smtp: aiosmtplib.SMTP | None = None

    @property
    def connected(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected

    async def connect(self) -> None:
        self._smtp, self.ehlo_name = await open_session(
            self.endpoint, self.ca_file, self.connect_timeout
        )

    async def send(
        self, mail_from: str, recipients: Sequence[str], prefix: bytes, raw: bytes
    ) -> dict[str, Reply]:
        """One transaction. Returns each recipient's reply; raises SmtpError if the link fails
        before the final dot. After it, the accepted recipients get `no_reply` instead.

        One deadline (FORWARDER_SMTP_TIMEOUT, default 600 s: RFC 5321 4.5.3.2's 10 minutes
        for the final reply) covers the whole transaction: a timer per command would cost
        a task per command.
        """
        progress = _Progress()
        try:
            return await self._guarded(
                self._transaction(mail_from, recipients, prefix, raw, progress)
            )
        except SmtpError as exc:
            if not progress.dot_written:
                raise  # nothing can have been delivered
            unknown = no_reply(exc.detail or type(exc).__name__)
            return {**progress.refused, **dict.fromkeys(progress.accepted, unknown)}

    async def probe(self, mail_from: str, recipients: Sequence[str]) -> dict[str, Reply]:
        """MAIL FROM and RCPT TO each recipient, then RSET: nothing is sent.

        Returns each recipient's RCPT reply; raises SubmissionRefused, as `send` would,
        when the server refuses the forwarder itself.
        """
        return await self._guarded(self._probe(mail_from, recipients))

    async def _guarded(self, work: Coroutine[Any, Any, dict[str, Reply]]) -> dict[str, Reply]:
        try:
            async with asyncio.timeout(self.endpoint.timeout):
                return await work
        except SubmissionRefused:
            # The link is fine, but a new session is needed to see a fixed configuration
            # (Postfix's smtpd reads a rebuilt sender map only between connections).
            await self.close()
            raise
        except SmtpError:
            self.drop()
            raise
        except TimeoutError:
            self.drop()
            raise SmtpError(
                f"no reply within {self.endpoint.timeout:g} s",
                server=self.server,
                advice="the message will be sent again",
                settings=("FORWARDER_SMTP_TIMEOUT",),
            ) from None
        except (SMTPException, OSError) as exc:
            self.drop()
            raise transaction_error(exc, server=self.server) from None

    async def _transaction(
        self,
        mail_from: str,
        recipients: Sequence[str],
        prefix: bytes,
        raw: bytes,
        progress: _Progress,
    ) -> dict[str, Reply]:
        replies, accepted = await self._envelope(mail_from, recipients, prefix, raw)
        if accepted:
            smtp = self._smtp
            assert smtp is not None
            progress.refused, progress.accepted = replies, list(accepted)
            replies.update(dict.fromkeys(accepted, await self._data(smtp, prefix, raw, progress)))
        return replies

    async def _probe(self, mail_from: str, recipients: Sequence[str]) -> dict[str, Reply]:
        replies, accepted = await self._envelope(mail_from, recipients, None, None)
        if accepted:
            await self._reset()
        return {r: accepted.get(r) or replies[r] for r in recipients}

    async def _envelope(
        self,
        mail_from: str,
        recipients: Sequence[str],
        prefix: bytes | None,
        raw: bytes | None,
    ) -> tuple[dict[str, Reply], dict[str, Reply]]:
        """MAIL FROM and the RCPTs: the replies of the refused and of the accepted recipients.

        Without a message (a probe), MAIL FROM carries no SIZE or BODY.
        """
        accepted: dict[str, Reply] = {}
        replies = await self._mail(mail_from, recipients, prefix, raw)
        if replies is not None:
            return replies, accepted
        smtp = self._smtp
        assert smtp is not None
        utf8 = smtp.supports_extension("smtputf8")
        replies = {r: NON_ASCII_REFUSED for r in recipients if not r.isascii() and not utf8}
        for rcpt in recipients:
            if rcpt in replies:
                continue
            response = await smtp.execute_command(b"RCPT", b"TO:" + path(rcpt, utf8), timeout=None)
            reply = Reply(response.code, response.message)
            if response.code in (ReplyCode.OK, ReplyCode.WILL_FORWARD):
                accepted[rcpt] = reply
            else:
                replies[rcpt] = reply
        if not accepted:
            await self._reset()
            if all(reply.about.ours for reply in replies.values()):
                raise self._refused(mail_from, next(iter(replies.values())))
        return replies, accepted

    async def _data(
        self, smtp: aiosmtplib.SMTP, prefix: bytes, raw: bytes, progress: _Progress
    ) -> Reply:
        """DATA, streamed: pieces are written as the socket drains, never a whole copy.

        `progress.dot_written` is set once the final dot is handed to the connection: a
        failure from then on may come after the server delivered the message.
        """
        response = await smtp.execute_command(b"DATA", timeout=None)
        if response.code != ReplyCode.START_DATA:
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
        progress.dot_written = True
        response = await protocol.read_response(timeout=None)
        return Reply(response.code, response.message)

    async def _mail(
        self,
        mail_from: str,
        recipients: Sequence[str],
        prefix: bytes | None,
        raw: bytes | None,
    ) -> dict[str, Reply] | None:
        """MAIL FROM, on a fresh connection if the reused one went stale (nothing sent yet).

        Returns replies for every recipient when the transaction cannot start for this
        message (too large, 8-bit without 8BITMIME, or a 4xx or size refusal); None when
        it may go on. A refusal of the envelope sender raises SubmissionRefused.
        """
        size = len(prefix) + len(raw) if prefix is not None and raw is not None else None
        eight_bit = raw is not None and not raw.isascii()  # the prefix is ASCII
        for attempt in (1, 2):
            if not self.connected:
                await self.connect()
            smtp = self._smtp
            assert smtp is not None
            offered = smtp.esmtp_extensions
            limit = size_limit(offered)
            if size is not None and limit and size > limit:
                text = f"message size {size} exceeds the server's limit of {limit}"
                return dict.fromkeys(recipients, Reply(ReplyCode.EXCEEDED_STORAGE, text))
            if eight_bit_refused(offered, eight_bit):
                return dict.fromkeys(recipients, EIGHT_BIT_REFUSED)
            options = mail_options(
                offered,
                size=size,
                eight_bit=eight_bit,
                utf8_envelope=utf8_envelope(mail_from, recipients),
            )
            if not mail_from.isascii() and "SMTPUTF8" not in options:
                raise self._refused(mail_from, NON_ASCII_REFUSED)
            sender = path(mail_from, "SMTPUTF8" in options)
            try:
                response = await smtp.execute_command(
                    b"MAIL",
                    b"FROM:" + sender,
                    *(option.encode("ascii") for option in options),
                    timeout=None,  # under the transaction's deadline
                )
            except SMTPServerDisconnected:
                self.drop()
                if attempt == 2:
                    raise
                continue
            if response.code == ReplyCode.OK:
                return None
            await self._reset()
            reply = Reply(response.code, response.message)
            if not reply.about.ours and (reply.transient or about_the_message(reply)):
                return dict.fromkeys(recipients, reply)
            raise self._refused(mail_from, reply)
        raise AssertionError("unreachable")

    def _refused(self, mail_from: str, reply: Reply) -> SubmissionRefused:
        return submission_refused(
            reply,
            server=self.server,
            mail_from=mail_from,
            logged_in=bool(self.endpoint.username),
        )

    async def _reset(self) -> None:
        if self._smtp is not None and self._smtp.is_connected:
            try:
                await self._smtp.rset()
            except (SMTPException, OSError):
                self.drop()

    def drop(self) -> None:
        """Forget a broken or stuck connection at once: abort, no goodbye."""
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            if isinstance(smtp.transport, asyncio.Transport):
                # close() on a TLS transport waits for the peer's close_notify, and leaves
                # the socket open if the loop ends first; abort() closes it now.
                smtp.transport.abort()
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
            "size_limit": size_limit(smtp.esmtp_extensions),
            "8bitmime": smtp.supports_extension("8bitmime"),
            "smtputf8": smtp.supports_extension("smtputf8"),
            "ehlo_name": self.ehlo_name,
        }
