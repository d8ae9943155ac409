"""The private Cyrus (tests/servers/cyrus.py) does what the tests and docs/deployments.md assume."""

from __future__ import annotations

import re
import smtplib

import pytest

from tests.mail import build_message
from tests.servers.cyrus import CyrusServer


def head(raw: bytes) -> bytes:
    return re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0]


def test_lmtp_delivers_into_the_catch_all_by_its_name(cyrus: CyrusServer) -> None:
    cyrus.deliver(build_message(to="contact@example.org"), ["catchall@example.org"])
    [(_, flags, raw)] = cyrus.messages()
    assert b"\\Seen" not in flags
    assert b"To: contact@example.org" in raw


def test_lmtp_refuses_an_address_that_is_no_mailbox(cyrus: CyrusServer) -> None:
    """So the catch-all is the MTA's doing, and the list address is lost on the way."""
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        cyrus.deliver(build_message(), ["contact@example.org"])
    [(code, _)] = refused.value.recipients.values()
    assert code == 550


def test_lmtp_records_no_envelope_recipient(cyrus: CyrusServer) -> None:
    cyrus.deliver(build_message(to="someone@example.org"), ["catchall"])
    [(_, _, raw)] = cyrus.messages()
    assert b"catchall" not in head(raw).lower()
    assert b"Delivered-To" not in head(raw) and b" for " not in head(raw)


def test_default_duplicate_suppression_drops_a_second_copy_silently(
    cyrus_dedup: CyrusServer,
) -> None:
    raw = build_message(to="contact@example.org", cc="compta@example.org")
    cyrus_dedup.deliver(raw, ["catchall"])
    cyrus_dedup.deliver(raw, ["catchall"])  # accepted: no error here
    assert len(cyrus_dedup.messages()) == 1
    assert "dupelim: eliminated duplicate message" in cyrus_dedup.log()


def test_without_duplicate_suppression_both_copies_are_kept(cyrus: CyrusServer) -> None:
    raw = build_message(to="contact@example.org", cc="compta@example.org")
    cyrus.deliver(raw, ["catchall"])
    cyrus.deliver(raw, ["catchall"])
    assert len(cyrus.messages()) == 2


def test_lmtp_turns_8bit_header_bytes_into_x(cyrus: CyrusServer) -> None:
    cyrus.deliver(build_message(subject="Réunion"), ["catchall"])
    [(_, _, raw)] = cyrus.messages()
    assert b"Subject: RXXunion" in raw
