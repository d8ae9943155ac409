"""MAIL FROM parameters and the EHLO name (forwarder.esmtp). Pure."""

from __future__ import annotations

import pytest

from forwarder.esmtp import (
    address_literal,
    check_helo_name,
    ehlo_name,
    eight_bit_refused,
    mail_options,
    path,
    size_limit,
    utf8_envelope,
)

POSTFIX = {"size", "8bitmime", "smtputf8", "pipelining", "enhancedstatuscodes"}
OLD = {"size"}  # neither 8BITMIME nor SMTPUTF8


def test_ascii_message_asks_for_its_size_only() -> None:
    assert mail_options(POSTFIX, size=1234, eight_bit=False, utf8_envelope=False) == ["SIZE=1234"]


def test_8bit_message_is_body_8bitmime_and_not_smtputf8() -> None:
    options = mail_options(POSTFIX, size=10, eight_bit=True, utf8_envelope=False)
    assert options == ["SIZE=10", "BODY=8BITMIME"]


def test_smtputf8_is_asked_for_a_non_ascii_envelope_address_only() -> None:
    options = mail_options(POSTFIX, size=10, eight_bit=True, utf8_envelope=True)
    assert options == ["SIZE=10", "BODY=8BITMIME", "SMTPUTF8"]
    assert utf8_envelope("lists@example.org", ["zoé@example.org"])
    assert utf8_envelope("listes@exämple.org", ["bob@example.org"])
    assert not utf8_envelope("lists@example.org", ["bob@example.org"])


def test_a_probe_without_a_message_gives_no_size() -> None:
    assert mail_options(POSTFIX, size=None, eight_bit=False, utf8_envelope=False) == []


def test_an_8bit_message_without_8bitmime_is_refused_and_an_ascii_one_is_not() -> None:
    assert eight_bit_refused(OLD, eight_bit=True)
    assert eight_bit_refused({"size", "smtputf8"}, eight_bit=True)  # 8BITMIME is what counts
    assert not eight_bit_refused(OLD, eight_bit=False)
    assert not eight_bit_refused(POSTFIX, eight_bit=True)


@pytest.mark.parametrize(
    ("value", "limit"), [("10240000", 10240000), ("", 0), ("0", 0), ("lots", 0)]
)
def test_size_limit_is_read_from_the_size_keyword(value: str, limit: int) -> None:
    assert size_limit({"size": value}) == limit
    assert size_limit({}) == 0


def test_ehlo_name_is_the_configured_name_first() -> None:
    assert ehlo_name("mail.example.org", "host.example.net", "192.0.2.10") == "mail.example.org"


def test_ehlo_name_is_the_fqdn_when_the_machine_has_one() -> None:
    assert ehlo_name(None, "host.example.net.", "192.0.2.10") == "host.example.net"


@pytest.mark.parametrize(
    "fqdn", ["localhost", "vm", "localhost.localdomain", "host.localdomain", "", "bad_name.example"]
)
def test_ehlo_name_is_the_address_literal_without_a_real_fqdn(fqdn: str) -> None:
    assert ehlo_name(None, fqdn, "192.0.2.10") == "[192.0.2.10]"


@pytest.mark.parametrize(
    ("address", "literal"),
    [
        ("127.0.0.1", "[127.0.0.1]"),
        ("2001:db8::1", "[IPv6:2001:db8::1]"),
        ("fe80::1%eth0", "[IPv6:fe80::1]"),
        ("::ffff:192.0.2.1", "[192.0.2.1]"),
    ],
)
def test_address_literal_follows_rfc_5321(address: str, literal: str) -> None:
    assert address_literal(address) == literal


@pytest.mark.parametrize("name", ["mail.example.org", "[192.0.2.1]", "[IPv6:2001:db8::1]", "mx"])
def test_helo_name_setting_accepts_names_and_literals(name: str) -> None:
    assert check_helo_name(f" {name} ") == name


@pytest.mark.parametrize(
    "name",
    [
        "mail.example.org\r\nMAIL FROM:<x@y>",
        "two words",
        "-bad.example",
        "[deadbeef]",
        "[2001:db8::1]",  # IPv6 literals are tagged
        "",
    ],
)
def test_helo_name_setting_refuses_anything_else(name: str) -> None:
    with pytest.raises(ValueError, match="host name"):
        check_helo_name(name)


@pytest.mark.parametrize(
    "address",
    ["alice@example.org", "o'neil+tag@example.org", "a.b@example.org.", "#!$%&*/=?^_`{|}~-@x.org"],
)
def test_an_envelope_address_goes_out_as_configured_in_angle_brackets(address: str) -> None:
    assert path(address, utf8=False) == f"<{address}>".encode()


def test_an_envelope_address_loses_only_surrounding_blanks() -> None:
    assert path("  alice@example.org ", utf8=False) == b"<alice@example.org>"


def test_a_non_ascii_envelope_address_goes_out_as_utf8_with_smtputf8_only() -> None:
    assert path("élise@exemple.fr", utf8=True) == "<élise@exemple.fr>".encode()
    with pytest.raises(ValueError, match="SMTPUTF8"):
        path("élise@exemple.fr", utf8=False)


@pytest.mark.parametrize(
    "address",
    [
        "",
        "alice@example.org> SIZE=1",
        "alice@example.org NOTIFY=NEVER",
        "alice@example.org\r\nRSET",
        "<alice@example.org>",
        "alice\x00@example.org",
        "alice\x7f@example.org",
    ],
)
def test_an_address_that_could_change_the_command_line_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match="envelope address"):
        path(address, utf8=True)
