"""The private Exim (tests/servers/exim.py) does what the tests and docs/deployments.md assume."""

from __future__ import annotations

import re
from email import message_from_bytes

from tests.mail import build_message
from tests.servers.exim import EximServer


def envelope_to(raw: bytes) -> list[str]:
    """The addresses of the Envelope-to: header (folded over several lines by Exim)."""
    values = message_from_bytes(raw).get_all("Envelope-to") or []
    return [a.strip() for v in values for a in re.sub(r"\s+", " ", v).split(",")]


def test_mail_to_a_list_address_lands_in_the_catch_all_naming_it(
    exim_dovecot: EximServer,
) -> None:
    exim_dovecot.send_to_mx(build_message(to="Contact+Urgent@Example.org"),
                            ["Contact+Urgent@Example.org"])
    exim_dovecot.wait_idle()
    [(_, _, raw)] = exim_dovecot.store.messages()
    assert envelope_to(raw) == ["Contact+Urgent@Example.org"]


def test_one_transaction_for_several_addresses_is_one_copy_naming_them_all(
    exim_dovecot: EximServer,
) -> None:
    """Exim delivers once to the address they all redirect to, and lists them all."""
    rcpts = ["contact@example.org", "compta@example.org", "direction@example.org"]
    exim_dovecot.send_to_mx(build_message(to="contact@example.org"), rcpts)
    exim_dovecot.wait_idle()
    [(_, _, raw)] = exim_dovecot.store.messages()
    assert sorted(envelope_to(raw)) == sorted(rcpts)


def test_lmtp_into_cyrus_names_the_address_in_envelope_to(exim_cyrus: EximServer) -> None:
    exim_cyrus.send_to_mx(build_message(to="contact@example.org"), ["compta@example.org"])
    exim_cyrus.wait_idle()
    [(_, _, raw)] = exim_cyrus.store.messages()
    assert envelope_to(raw) == ["compta@example.org"]
    assert "R=catchall_delivery T=catchall_delivery" in exim_cyrus.log()
