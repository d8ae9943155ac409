"""Unit tests for forwarder.setting_values: durations, host names, protocol-safe text."""

from __future__ import annotations

import pytest

from forwarder.setting_values import (
    check_host,
    check_protocol_text,
    format_duration,
    parse_duration,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("90", 90.0, id="plain-number-is-seconds"),
        pytest.param("0.2", 0.2, id="fraction-of-a-second"),
        pytest.param("90s", 90.0, id="seconds"),
        pytest.param("10m", 600.0, id="minutes"),
        pytest.param("2h", 7200.0, id="hours"),
        pytest.param("5d", 432000.0, id="days"),
        pytest.param(" 10M ", 600.0, id="any-case-and-spaces"),
        pytest.param("1.5h", 5400.0, id="fractional-unit"),
        pytest.param("1h30m", 5400.0, id="combined"),
        pytest.param("1h 30m", 5400.0, id="combined-with-space"),
        pytest.param("5 d", 432000.0, id="space-before-unit"),
    ],
)
def test_parse_duration_reads_seconds_and_units(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "ten", "5 days", "10x", "m", "1h30", "-5m", "5d!", "1e3"])
def test_parse_duration_refuses_what_is_no_duration(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_parse_duration_leaves_numbers_to_the_field():
    assert parse_duration(42) == 42


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(432000, "5d"), (7200, "2h"), (600, "10m"), (60, "1m"), (90, "90s"), (0.2, "0.2s")],
)
def test_format_duration_gives_the_shortest_exact_spelling(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "host",
    [
        "imap.example.org",
        "localhost",
        "127.0.0.1",
        "::1",
        "2001:db8::1",
        "mail.example.org.",
        "mx_1.example.org",
    ],
)
def test_check_host_accepts_a_host_name_or_an_address(host):
    assert check_host(host, "FORWARDER_IMAP_PORT") == host


@pytest.mark.parametrize(
    ("host", "said"),
    [
        pytest.param(
            "imap.example.org:993",
            "set the host to imap.example.org and the port (993) in FORWARDER_IMAP_PORT",
            id="name-and-port",
        ),
        pytest.param(
            "[::1]:143",
            "set the host to ::1 and the port (143) in FORWARDER_IMAP_PORT",
            id="ipv6-and-port",
        ),
        pytest.param("127.0.0.1:143", "port (143) in FORWARDER_IMAP_PORT", id="ipv4-and-port"),
        pytest.param("[::1]", "without brackets", id="ipv6-in-brackets"),
        pytest.param("imaps://imap.example.org", "is a URL", id="url"),
        pytest.param("imap example.org", "not a host name", id="space"),
        pytest.param("", "not a host name", id="empty"),
    ],
)
def test_check_host_refuses_a_port_or_anything_else_naming_the_port_setting(host, said):
    with pytest.raises(ValueError) as caught:
        check_host(host, "FORWARDER_IMAP_PORT")
    assert said in str(caught.value)


@pytest.mark.parametrize(
    ("text", "named"),
    [("a\r\nZ1 DELETE x", "CR and LF"), ("a\nb", "LF"), ("a\rb", "CR"), ("a\0b", "NUL")],
)
def test_check_protocol_text_refuses_line_breaks_and_nul(text, named):
    with pytest.raises(ValueError) as caught:
        check_protocol_text(text)
    assert f"contains {named}" in str(caught.value)
    assert "\r" not in str(caught.value) and "\n" not in str(caught.value)


def test_check_protocol_text_never_shows_a_secret():
    with pytest.raises(ValueError) as caught:
        check_protocol_text("hunter2\r\nZ1 DELETE x", secret=True)
    assert "hunter2" not in str(caught.value) and "DELETE" not in str(caught.value)
