"""The private Courier (tests/servers/courier.py) does what the tests and docs/deployments.md
assume."""

from __future__ import annotations

import pytest
from imapclient.exceptions import IMAPClientError

from tests.mail import build_message
from tests.servers.courier import CourierServer


def test_delivered_mail_is_served_with_delivered_to_on_top(courier: CourierServer) -> None:
    courier.deliver(build_message(), ["Contact+x@Example.org"])
    [(_, flags, raw)] = courier.messages()
    assert raw.startswith(b"Delivered-To: Contact+x@Example.org\r\n")
    assert b"\\Seen" not in flags


def test_keywords_are_kept_by_default(courier: CourierServer) -> None:
    courier.deliver(build_message(), ["contact@example.org"])
    with courier.imap() as client:
        status = client.select_folder("INBOX")
        assert b"\\*" in status[b"PERMANENTFLAGS"]
        client.add_flags(client.search("ALL"), [b"$Forwarded"])
        client.logout()
    [(_, flags, _)] = courier.messages()
    assert b"$Forwarded" in flags


def test_without_keywords_a_store_naming_one_is_refused_and_seen_is_lost_with_it(
    courier_without_keywords: CourierServer,
) -> None:
    courier_without_keywords.deliver(build_message(), ["contact@example.org"])
    with courier_without_keywords.imap() as client:
        status = client.select_folder("INBOX")
        assert b"\\*" not in status[b"PERMANENTFLAGS"]
        # Courier's text for a BAD answer:
        with pytest.raises(IMAPClientError, match="Error in IMAP command received by server"):
            client.add_flags(client.search("ALL"), [b"$Forwarded", b"\\Seen"])
        client.logout()
    [(_, flags, _)] = courier_without_keywords.messages()
    assert flags == set()


def test_courier_offers_no_move(courier: CourierServer) -> None:
    with courier.imap() as client:
        assert b"MOVE" not in client.capabilities()
        client.logout()
