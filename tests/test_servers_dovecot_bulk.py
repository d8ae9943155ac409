"""The bulk mailbox builder (tests/servers/dovecot_bulk.py) against the real Dovecot, in
both mail formats. 1,000 messages here; the bench fills 100,000."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.conftest import LISTS, MakeSettings, forward_once
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink
from tests.servers.dovecot import MailFormat
from tests.servers.dovecot_bulk import FAST_DIR, LIST_ADDRESS, UNMATCHED_ADDRESS, fill

DELIVERED_TO = re.compile(rb"^Delivered-To: (\S+)\r\n", re.MULTILINE)


@pytest.fixture(scope="module", params=["maildir", "sdbox"])
def bulk_mailserver(request: pytest.FixtureRequest) -> Iterator[MailServer]:
    mail_format: MailFormat = request.param
    with MailServer(mail_format=mail_format, parent=FAST_DIR) as server:
        yield server


@pytest.fixture
def bulk_server(bulk_mailserver: MailServer) -> MailServer:
    """A Dovecot of each format with an empty INBOX (UIDs go on from the last test)."""
    bulk_mailserver.clear()
    return bulk_mailserver


def delivered_to(server: MailServer) -> dict[int, str]:
    """UID -> the Delivered-To of every message in INBOX."""
    with server.imap() as client:
        client.select_folder("INBOX", readonly=True)
        fetched = client.fetch(client.search("ALL"), ["BODY.PEEK[HEADER.FIELDS (DELIVERED-TO)]"])
        client.logout()
    found = {}
    for uid, data in fetched.items():
        match = DELIVERED_TO.search(data[b"BODY[HEADER.FIELDS (DELIVERED-TO)]"])
        assert match is not None
        found[uid] = match[1].decode()
    return found


def test_fill_gives_every_message_its_uid_and_a_third_name_no_list(
    bulk_server: MailServer,
) -> None:
    filled = fill(bulk_server, 1000)
    assert (filled.last_uid - filled.first_uid, filled.count) == (999, 1000)
    assert len(filled.unmatched) == 334
    rcpts = delivered_to(bulk_server)
    assert sorted(rcpts) == list(range(filled.first_uid, filled.last_uid + 1))
    assert {uid for uid, rcpt in rcpts.items() if rcpt == UNMATCHED_ADDRESS} == filled.unmatched
    assert {rcpt for uid, rcpt in rcpts.items() if uid not in filled.unmatched} == {LIST_ADDRESS}


def test_fill_gives_the_sizes_and_bytes_imap_reads(bulk_server: MailServer) -> None:
    fill(bulk_server, 5)
    with bulk_server.imap() as client:
        client.select_folder("INBOX", readonly=True)
        fetched = client.fetch(client.search("ALL"), ["RFC822.SIZE", "BODY.PEEK[]"])
        client.logout()
    for data in fetched.values():
        raw = data[b"BODY[]"]
        assert data[b"RFC822.SIZE"] == len(raw) and raw.endswith(b".\r\n")
        assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")


def test_fill_appends_after_delivered_mail(bulk_server: MailServer) -> None:
    bulk_server.deliver(build_message(), [LIST_ADDRESS])
    [delivered] = delivered_to(bulk_server)
    filled = fill(bulk_server, 10)
    assert (filled.first_uid, filled.last_uid) == (delivered + 1, delivered + 10)
    assert sorted(delivered_to(bulk_server)) == list(range(delivered, delivered + 11))


async def test_a_filled_folder_is_forwarded_like_delivered_mail(
    bulk_server: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    filled = fill(bulk_server, 30)
    summary = await forward_once(make_settings(imap_port=bulk_server.imap_port))
    assert summary.skipped == len(filled.unmatched) == 10
    assert len(smtp_sink.received) == 20
    assert {r for m in smtp_sink.received for r in m.rcpt_tos} == set(LISTS[LIST_ADDRESS])
