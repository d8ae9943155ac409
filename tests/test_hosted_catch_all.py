"""A catch-all that records no envelope recipient, as some hosted providers give
(docs/deployments.md, "Hosted providers"): what works, and what does not (Bcc).

Dovecot's LMTP stands in for it: given several recipients in one transaction, it
stores one identical copy per recipient, none of which says whom it was for.
"""

from __future__ import annotations

import re

from structlog.testing import capture_logs

from tests.conftest import MakeSettings, forward_once
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink


def rcpts(sink: SmtpSink) -> list[str]:
    return sorted(r for t in sink.received for r in t.rcpt_tos)


def test_the_stand_in_records_no_recipient(mailbox: MailServer) -> None:
    mailbox.deliver(build_message(), ["contact@example.org", "direction@example.org"])
    for _, _, raw in mailbox.messages():
        head = re.split(rb"\r\n\r\n", raw, maxsplit=1)[0]
        assert b"Delivered-To" not in head and b"example.org>" not in head.split(b"\r\n", 1)[1]


async def test_a_list_in_to_reaches_its_members_once_from_several_copies(
    mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    mailbox.deliver(build_message(to="contact@example.org"),
                    ["contact@example.org", "compta@example.org"])
    assert len(mailbox.messages()) == 2
    with capture_logs() as events:
        await forward_once(make_settings())
    assert rcpts(smtp_sink) == ["alice@example.org", "bob@example.org"]
    assert {e["matched_by"] for e in events if e["event"] == "message_forwarded"} == {"to/cc"}


async def test_a_list_only_in_bcc_is_skipped_as_unmatched(
    mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    mailbox.deliver(build_message(to="someone@remote.example"),
                    ["direction@example.org", "compta@example.org"])
    with capture_logs() as events:
        await forward_once(make_settings())
    assert smtp_sink.received == []
    skipped = [e["reason"] for e in events if e["event"] == "message_skipped"]
    assert skipped == ["unmatched", "unmatched"]


async def test_a_list_in_bcc_next_to_one_in_to_is_missed_silently(
    mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    mailbox.deliver(build_message(to="contact@example.org"),
                    ["contact@example.org", "direction@example.org"])
    await forward_once(make_settings())
    assert "dave@example.org" not in rcpts(smtp_sink)  # direction@'s only member
    assert rcpts(smtp_sink) == ["alice@example.org", "bob@example.org"]
