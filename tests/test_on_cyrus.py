"""The forwarder on a catch-all served by Cyrus IMAP, with Exim delivering into it by LMTP
(docs/deployments.md, "Cyrus IMAP").

Cyrus's lmtpd records no envelope recipient and has no catch-all of its own: Exim
redirects every address of the domain to the catch-all mailbox and writes them in
``Envelope-to:``. Cyrus's default ``duplicatesuppression: 1`` drops a second message
with the same Message-ID for the same mailbox: a message sent to two lists that arrives
in two deliveries (two SMTP transactions: another MX, a sender's server that splits
recipients) reaches the catch-all once, and the second list's members never get it.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import forward_once, settings_for
from tests.mail import build_message
from tests.servers.exim import EximServer
from tests.servers.sink import SmtpSink


def rcpts(sink: SmtpSink) -> list[str]:
    return sorted(r for t in sink.received for r in t.rcpt_tos)


def arrive_twice(exim: EximServer, raw: bytes) -> None:
    """The same message for contact@ and compta@, in two SMTP transactions."""
    exim.send_to_mx(raw, ["contact@example.org"])
    exim.send_to_mx(raw, ["compta@example.org"])
    exim.wait_idle()


async def test_a_list_only_in_bcc_is_routed_from_envelope_to(
    exim_cyrus: EximServer, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    exim_cyrus.send_to_mx(build_message(to="someone@remote.example"), ["direction@example.org"])
    exim_cyrus.wait_idle()
    await forward_once(settings_for(exim_cyrus.store, smtp_sink, tmp_path / "s.db"))
    assert rcpts(smtp_sink) == ["dave@example.org"]


async def test_a_message_for_two_lists_delivered_twice_reaches_both_lists_members(
    exim_cyrus: EximServer, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    arrive_twice(exim_cyrus, build_message(to="contact@example.org, compta@example.org"))
    assert len(exim_cyrus.store.messages()) == 2
    settings = settings_for(exim_cyrus.store, smtp_sink, tmp_path / "s.db")
    await forward_once(settings)
    await forward_once(settings)
    assert rcpts(smtp_sink) == ["alice@example.org", "bob@example.org", "carol@example.org"]


async def test_with_default_duplicate_suppression_the_second_lists_members_never_get_it(
    exim_cyrus_dedup: EximServer, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    """Why the recipe sets duplicatesuppression: 0 (a loss nobody is told about)."""
    raw = build_message(to="someone@remote.example")  # both lists in Bcc
    arrive_twice(exim_cyrus_dedup, raw)
    assert len(exim_cyrus_dedup.store.messages()) == 1
    await forward_once(settings_for(exim_cyrus_dedup.store, smtp_sink, tmp_path / "s.db"))
    assert rcpts(smtp_sink) == ["alice@example.org", "bob@example.org"]  # no carol


async def test_each_message_goes_out_once_and_is_flagged(
    exim_cyrus: EximServer, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    exim_cyrus.send_to_mx(build_message(to="contact@example.org"), ["contact@example.org"])
    exim_cyrus.wait_idle()
    settings = settings_for(exim_cyrus.store, smtp_sink, tmp_path / "s.db")
    await forward_once(settings)
    await forward_once(settings)
    assert rcpts(smtp_sink) == ["alice@example.org", "bob@example.org"]
    [(_, flags, _)] = exim_cyrus.store.messages()
    assert {b"$Forwarded", b"\\Seen"} <= flags
