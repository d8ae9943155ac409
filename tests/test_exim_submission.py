"""The forwarder sending through a real Exim submission server (docs/deployments.md,
"Exim as the submission server"): the copies relayed onward (to the SMTP sink) keep the
envelope sender and the bytes, unless Exim's submission mode fixes the message up."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.conftest import ADMIN, forward_once, settings_for
from tests.servers import MailServer, SmtpSink
from tests.servers.exim import (
    SUBMISSION_ACL,
    SUBMISSION_LOGIN,
    SUBMISSION_PASSWORD,
    EximServer,
)

# A third party's message with no Message-ID and no Date (a DKIM signature may have
# signed their absence).
RAW = (
    b"From: Customer <customer@remote.example>\r\nTo: contact@example.org\r\n"
    b"Subject: no id, no date\r\n\r\nbody\r\n"
)

StartExim = Callable[..., EximServer]


def through(exim: EximServer, mailbox: MailServer, smtp_sink: SmtpSink, tmp_path: Path):  # type: ignore[no-untyped-def]
    return settings_for(
        mailbox, smtp_sink, tmp_path / "s.db", smtp_host=exim.host, smtp_port=exim.port,
        smtp_username=SUBMISSION_LOGIN, smtp_password=SUBMISSION_PASSWORD,
    )


def head(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0]


async def test_each_member_gets_the_bytes_with_the_envelope_sender(
    exim_submission: StartExim, mailbox: MailServer, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    exim = exim_submission()
    mailbox.deliver(RAW, ["contact@example.org"])
    [(_, _, stored)] = mailbox.messages()
    await forward_once(through(exim, mailbox, smtp_sink, tmp_path))
    exim.wait_idle()
    [relayed] = smtp_sink.wait_for(1)
    assert relayed.mail_from == ADMIN
    assert sorted(relayed.rcpt_tos) == ["alice@example.org", "bob@example.org"]
    # Everything the catch-all stored but its Return-Path (Exim drops one in a message it
    # receives: return_path_remove), under the lines Exim and the forwarder added on top.
    return_path, original = stored.split(b"\r\n", 1)
    assert return_path.startswith(b"Return-Path:")
    assert relayed.data.endswith(original)
    added = relayed.data[: -len(original)].removesuffix(b"\r\n").split(b"\r\n")
    names = [line.split(b":")[0] for line in added if line[:1] not in b" \t"]
    assert names == [b"Received", b"Received", b"X-Loop"]  # Exim's, then the forwarder's


async def test_in_submission_mode_exim_adds_message_id_and_date(
    exim_submission: StartExim, mailbox: MailServer, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    """Why the recipe exempts the forwarder's login from Debian's submission mode."""
    exim = exim_submission(SUBMISSION_ACL)
    mailbox.deliver(RAW, ["contact@example.org"])
    await forward_once(through(exim, mailbox, smtp_sink, tmp_path))
    exim.wait_idle()
    [relayed] = smtp_sink.wait_for(1)
    assert b"\r\nMessage-Id: " in head(relayed.data) and b"\r\nDate: " in head(relayed.data)
