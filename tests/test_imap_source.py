"""The IMAP primitives against the real Dovecot: UID ranges, message info, fetches that
survive an unreadable mail file, and keyword marks that are checked."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from forwarder.config import Settings
from forwarder.errors import UnreadableMessage
from forwarder.imap_fetch import uid_set
from forwarder.imap_source import FORWARD_FAILED, FORWARDED, SEEN, ImapSource
from tests.conftest import MakeSettings, imap_source
from tests.imap_faults import ImapFaultProxy
from tests.mail import build_message
from tests.servers import MailServer


def deliver(mailbox: MailServer, count: int) -> list[int]:
    """Deliver `count` messages; their UIDs."""
    for _ in range(count):
        mailbox.deliver(build_message(), ["contact@example.org"])
    return [uid for uid, _flags, _raw in mailbox.messages()][-count:]


def make_unreadable(mailbox: MailServer, uid: int) -> Path:
    """chmod 000 the mail file of `uid`: Dovecot (running as nobody) cannot open it."""
    body = next(raw for u, _flags, raw in mailbox.messages() if u == uid)
    marker = next(line for line in body.split(b"\r\n") if line.startswith(b"Message-ID:"))
    for path in mailbox.maildir.glob("*/*"):
        if path.is_file() and marker in path.read_bytes():
            path.chmod(0)
            return path
    raise AssertionError(f"no mail file for UID {uid}")


def make_readable(mailbox: MailServer) -> None:
    """Undo make_unreadable() (Dovecot may have moved the file from new/ to cur/)."""
    for path in mailbox.maildir.glob("*/*"):
        if path.is_file():
            path.chmod(0o600)


@pytest.fixture
def source(settings: Settings) -> Iterator[ImapSource]:
    """A connected source; mail delivered afterwards is seen after a `noop()`."""
    source = imap_source(settings)
    source.connect()
    yield source
    source.close()


def flags_of(mailbox: MailServer) -> dict[int, set[bytes]]:
    return {uid: flags for uid, flags, _raw in mailbox.messages()}


# --------------------------------------------------------------------------- UIDs


def test_uids_above_a_uid_are_only_the_greater_ones(
    mailbox: MailServer, settings: Settings
) -> None:
    uids = deliver(mailbox, 3)
    source = imap_source(settings)
    source.connect()
    try:
        assert source.uids_above(0) == uids
        assert source.uids_above(uids[0]) == uids[1:]
        # UID n:* names the highest UID even when n is above it (RFC 3501 6.4.8).
        assert source.uids_above(uids[-1]) == []
        assert source.uids_above(uids[-1] + 100) == []
    finally:
        source.close()


def test_uids_above_sees_mail_delivered_after_the_session_was_opened(
    mailbox: MailServer, source: ImapSource
) -> None:
    uids = deliver(mailbox, 2)
    assert source.uids_above(0) == uids


def test_select_gives_uidvalidity_and_uidnext(mailbox: MailServer, settings: Settings) -> None:
    uids = deliver(mailbox, 2)
    source = imap_source(settings)
    source.connect()
    try:
        assert source.uidvalidity == mailbox.uidvalidity()
        assert source.uidnext == uids[-1] + 1
    finally:
        source.close()


def test_message_info_gives_size_flags_and_internaldate(
    mailbox: MailServer, source: ImapSource
) -> None:
    uids = deliver(mailbox, 2)
    source.noop()
    source.mark([uids[0]], [FORWARDED])
    info = source.message_info([*uids, uids[-1] + 50], dates=True)  # unknown UID: absent
    assert sorted(info.found) == uids and info.unreadable == {}
    raws = {uid: raw for uid, _flags, raw in mailbox.messages()}
    for uid in uids:
        assert info.found[uid].size == len(raws[uid])
        assert isinstance(info.found[uid].internaldate, datetime)
        assert info.found[uid].internaldate.tzinfo is not None  # type: ignore[union-attr]
    assert FORWARDED in info.found[uids[0]].flags
    assert FORWARDED not in info.found[uids[1]].flags


def test_message_info_leaves_out_internaldate_unless_asked(
    mailbox: MailServer, source: ImapSource
) -> None:
    uids = deliver(mailbox, 1)
    source.noop()
    assert source.message_info(uids).found[uids[0]].internaldate is None


def test_uid_sets_name_runs_as_ranges() -> None:
    assert uid_set([9, 1, 2, 3, 4, 7, 10]) == "1:4,7,9:10"
    assert uid_set([5]) == "5"


def test_unforwarded_uids_leaves_out_flagged_messages(
    mailbox: MailServer, source: ImapSource
) -> None:
    uids = deliver(mailbox, 3)
    source.noop()
    source.mark([uids[1]], [FORWARDED])
    assert source.unforwarded_uids() == [uids[0], uids[2]]


# --------------------------------------------------------------------------- unreadable


def test_fetch_with_an_unreadable_mail_file_returns_the_others_and_names_it(
    mailbox: MailServer, settings: Settings
) -> None:
    uids = deliver(mailbox, 21)
    bad = uids[7]
    raws = {uid: raw for uid, _flags, raw in mailbox.messages() if uid != bad}
    make_unreadable(mailbox, bad)
    source = imap_source(settings)
    source.connect()
    try:
        fetched = source.fetch(uids, source.sizes(uids))
    finally:
        source.close()
    assert "Permission denied" in mailbox.log_tail(200)  # Dovecot really could not read it
    assert sorted(fetched.found) == [u for u in uids if u != bad]
    assert list(fetched.unreadable) == [bad]
    error = fetched.unreadable[bad]
    assert isinstance(error, UnreadableMessage)
    assert f"UID {bad}" in str(error) and "Internal error" in str(error)
    assert {uid: bytes(raw) for uid, raw in fetched.found.items()} == raws


def test_fetch_of_a_large_unreadable_message_returns_it_as_unreadable(
    mailbox: MailServer, source: ImapSource
) -> None:
    uids = deliver(mailbox, 2)
    make_unreadable(mailbox, uids[1])
    source.noop()
    sizes = {uids[0]: 10, uids[1]: 10**6}  # the second one is read in parts
    fetched = source.fetch(uids, sizes)
    assert list(fetched.found) == [uids[0]] and list(fetched.unreadable) == [uids[1]]


# --------------------------------------------------------------------------- marks


def test_mark_stores_keywords_and_seen_and_reports_none_missing(
    mailbox: MailServer, source: ImapSource
) -> None:
    uids = deliver(mailbox, 2)
    source.noop()
    assert source.keywords
    assert source.mark(uids, [FORWARDED, SEEN]) == []
    assert all({FORWARDED, SEEN} <= flags for flags in flags_of(mailbox).values())


def test_mark_of_messages_already_flagged_reports_none_missing(
    mailbox: MailServer, source: ImapSource
) -> None:
    uids = deliver(mailbox, 2)
    source.noop()
    source.mark(uids[:1], [FORWARDED])
    # Dovecot answers no FETCH for a message whose flags did not change.
    assert source.mark(uids, [FORWARDED]) == []


def test_select_without_keywords_in_permanentflags_does_not_fail(
    mailbox: MailServer, imap_faults: ImapFaultProxy, make_settings: MakeSettings
) -> None:
    imap_faults.hide_keywords = True
    source = imap_source(make_settings(imap_port=imap_faults.port))
    source.connect()
    try:
        assert source.keywords is False
        assert source.describe_capabilities()["keywords"] is False
    finally:
        source.close()


def test_mark_in_a_folder_without_keywords_sends_no_keyword_and_still_sets_seen(
    mailbox: MailServer, make_settings: MakeSettings
) -> None:
    uids = deliver(mailbox, 2)
    with ImapFaultProxy(mailbox.host, mailbox.imap_port, record=True) as proxy:
        proxy.hide_keywords = True
        source = imap_source(make_settings(imap_port=proxy.port))
        source.connect()
        try:
            assert source.mark(uids, [FORWARDED, FORWARD_FAILED, SEEN]) == uids
        finally:
            source.close()
        sent = proxy.recorded("client")
    assert b"$Forwarded" not in sent
    assert all(flags == {SEEN} for flags in flags_of(mailbox).values())


@pytest.mark.parametrize("answer", ["no", "bad"])
def test_mark_refused_for_keywords_keeps_seen_and_turns_keywords_off(
    answer: str, mailbox: MailServer, imap_faults: ImapFaultProxy, make_settings: MakeSettings
) -> None:
    uids = deliver(mailbox, 2)
    imap_faults.keyword_store = answer  # type: ignore[assignment]
    source = imap_source(make_settings(imap_port=imap_faults.port))
    source.connect()
    try:
        assert source.keywords
        assert source.mark(uids, [FORWARDED, SEEN]) == uids
        assert source.keywords is False and source.keywords_refused
        assert source.mark(uids, [FORWARDED]) == uids  # not asked again this session
        source.noop()  # the session goes on
    finally:
        source.close()
    assert all(flags == {SEEN} for flags in flags_of(mailbox).values())


def test_mark_accepted_but_not_kept_reports_the_uids(
    mailbox: MailServer, imap_faults: ImapFaultProxy, make_settings: MakeSettings
) -> None:
    uids = deliver(mailbox, 3)
    imap_faults.keyword_store = "forget"
    source = imap_source(make_settings(imap_port=imap_faults.port))
    source.connect()
    try:
        assert source.mark(uids, [FORWARDED, SEEN]) == uids
    finally:
        source.close()
    assert all(flags == {SEEN} for flags in flags_of(mailbox).values())


def test_unreadable_file_really_is_unreadable_to_dovecot(mailbox: MailServer) -> None:
    """The fixture's premise: root can read it, Dovecot's imap process (nobody) cannot."""
    uids = deliver(mailbox, 1)
    path = make_unreadable(mailbox, uids[0])
    assert os.stat(path).st_mode & 0o777 == 0
    with mailbox.imap() as client:
        client.select_folder("INBOX", readonly=True)
        with pytest.raises(Exception, match="Internal error"):
            client.fetch(uids, ["BODY.PEEK[]"])
