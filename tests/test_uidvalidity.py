"""A folder recreated with a new UIDVALIDITY (restored from a backup, migrated, rebuilt by
the server): every UID changes, so the UID records of the old folder say nothing about
the new one. The old messages come back with their INTERNALDATE (an IMAP APPEND with the
date, as restore and migration tools do), with or without their keywords; the state
store's deliveries of them may have been pruned already. The ones the old folder's last
complete cycle had seen are not sent again; the new ones are (folder.py `_first_sight`).
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from structlog.testing import capture_logs

from forwarder.config import Settings
from tests.conftest import LISTS, forward_once
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink

CONTACT = "contact@example.org"
RETENTION = 90 * 24 * 3600.0  # FORWARDER_STATE_RETENTION's default


def append(mailbox: MailServer, raw: bytes, when: datetime, flags: tuple[bytes, ...]) -> None:
    with mailbox.imap() as client:
        client.append("INBOX", raw, flags=flags, msg_time=when)
        client.logout()


def subject(raw: bytes) -> str:
    """"new 0" of "Subject: new 0 #12" (tests.mail numbers every message)."""
    line = next(line for line in raw.splitlines() if line.startswith(b"Subject: "))
    return line.decode().removeprefix("Subject: ").rsplit(" #", 1)[0]


def copies(sink: SmtpSink) -> Counter[str]:
    """Copies sent, per subject."""
    found: Counter[str] = Counter()
    for r in sink.received:
        found[subject(r.data)] += len(r.rcpt_tos)
    return found


@pytest.mark.parametrize("keywords", ["kept", "lost"])
@pytest.mark.parametrize("deliveries", ["kept", "pruned"])
async def test_a_recreated_folder_sends_the_new_messages_and_not_the_old_ones_again(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings, keywords: str, deliveries: str
) -> None:
    received = datetime.now(UTC) - timedelta(hours=2)
    old = [build_message(to=CONTACT, subject=f"old {i}") for i in range(3)]
    for raw in old:
        append(mailbox, raw, received, ())
    await forward_once(settings)
    assert sum(copies(smtp_sink).values()) == 3 * len(LISTS[CONTACT])
    if deliveries == "pruned":  # a cycle past FORWARDER_STATE_RETENTION forgets them
        await forward_once(settings, now=datetime.now(UTC).timestamp() + RETENTION + 3600)

    before = mailbox.uidvalidity()
    mailbox.recreate_inbox()
    for raw in old:  # restored with their date; $Forwarded \Seen kept, or lost
        append(mailbox, raw, received, (b"$Forwarded", b"\\Seen") if keywords == "kept" else ())
    for i in range(2):
        mailbox.deliver(build_message(to=CONTACT, subject=f"new {i}"), [CONTACT])
    after = mailbox.uidvalidity()
    assert after != before
    smtp_sink.clear()

    with capture_logs() as logs:
        await forward_once(settings)
    assert copies(smtp_sink) == {"new 0": len(LISTS[CONTACT]), "new 1": len(LISTS[CONTACT])}
    [event] = [e for e in logs if e["event"] == "uidvalidity_changed"]
    assert (event["old"], event["new"], event["messages"]) == (before, after, 5)
    assert event["examined_again"] == 2
    assert event["not_sent_again"] == (0 if keywords == "kept" else 3)
    flags = {subject(raw): f for _, f, raw in mailbox.messages()}
    assert b"$Forwarded" in flags["new 0"] and b"$Forwarded" in flags["new 1"]

    await forward_once(settings)  # and the next cycle sends nothing
    assert sum(copies(smtp_sink).values()) == 2 * len(LISTS[CONTACT])
