"""The forwarder behind a real Exim: the MX redirects every address of the domain to the
catch-all and records them in ``Envelope-to:`` (docs/deployments.md, "Behind Exim").

The message reaches the catch-all through Exim, is read over IMAP (Dovecot serving the
Maildir Exim wrote; Cyrus in tests/test_on_cyrus.py) and re-sent to the SMTP sink.
"""

from __future__ import annotations

from pathlib import Path

from structlog.testing import capture_logs

from tests.conftest import forward_once, settings_for
from tests.mail import build_message
from tests.servers.exim import EximServer
from tests.servers.sink import SmtpSink


def rcpts(sink: SmtpSink) -> list[str]:
    return sorted(r for t in sink.received for r in t.rcpt_tos)


async def test_a_list_only_in_bcc_is_found_in_envelope_to(
    exim_dovecot: EximServer, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    exim_dovecot.send_to_mx(
        build_message(to="contact@example.org"), ["contact@example.org", "direction@example.org"]
    )
    exim_dovecot.wait_idle()
    with capture_logs() as events:
        await forward_once(settings_for(exim_dovecot.store, smtp_sink, tmp_path / "s.db"))
    assert rcpts(smtp_sink) == ["alice@example.org", "bob@example.org", "dave@example.org"]
    [forwarded] = [e for e in events if e["event"] == "message_forwarded"]
    assert forwarded["matched_by"] == "envelope-to"


async def test_two_lists_in_one_transaction_reach_each_member_once(
    exim_dovecot: EximServer, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    exim_dovecot.send_to_mx(
        build_message(to="contact@example.org, compta@example.org"),
        ["contact@example.org", "compta@example.org"],
    )
    exim_dovecot.wait_idle()
    settings = settings_for(exim_dovecot.store, smtp_sink, tmp_path / "s.db")
    await forward_once(settings)
    await forward_once(settings)
    assert rcpts(smtp_sink) == ["alice@example.org", "bob@example.org", "carol@example.org"]
    [(_, flags, _)] = exim_dovecot.store.messages()
    assert {b"$Forwarded", b"\\Seen"} <= flags
