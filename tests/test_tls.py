"""TLS to both servers: certificates are verified, and asking for TLS never falls back to plaintext.

IMAP: the ``tls_mailbox`` Dovecot (``ssl = required``, self-signed certificate
in ``ca_file``; STARTTLS on ``imap_port``, implicit TLS on ``imaps_port``). On
127.0.0.1 Dovecot counts the connection as secure and would allow a plaintext
login, so refusing to log in without TLS is entirely up to the forwarder.
SMTP: ``SmtpSink(tls=...)`` with its own self-signed certificate.
Connections that must not carry credentials in clear go through a recording
``FaultProxy`` so that the bytes on the wire can be checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from forwarder.errors import ForwarderError
from tests.conftest import MakeSettings, forward_once
from tests.faults import FaultProxy
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink

CONTACT = "contact@example.org"
SMTP_USER, SMTP_PASSWORD = "relay@example.org", "smtp-secret-9f2c"


def cleartext(sent: bytes) -> bytes:
    """What a client sent before its TLS handshake (up to its STARTTLS command)."""
    head, found, _ = sent.partition(b"STARTTLS\r\n")
    return head + found


def deliver(server: MailServer) -> None:
    server.deliver(build_message(to=CONTACT), [CONTACT])


def imaps(tls_mailbox: MailServer, **overrides: object) -> dict[str, object]:
    assert tls_mailbox.imaps_port is not None
    return {
        "imap_host": tls_mailbox.host,
        "imap_port": tls_mailbox.imaps_port,
        "imap_security": "tls",
        **overrides,
    }


# --------------------------------------------------------------------------- IMAP


async def test_imap_implicit_tls_without_the_ca_file_is_refused_naming_the_setting(
    tls_mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    deliver(tls_mailbox)
    with pytest.raises(ForwarderError) as error:
        await forward_once(make_settings(**imaps(tls_mailbox)))
    message = str(error.value)
    assert "certificate" in message.lower() and "FORWARDER_TLS_CA_FILE" in message
    assert f"{tls_mailbox.host}:{tls_mailbox.imaps_port}" in message
    assert smtp_sink.received == []


async def test_imap_implicit_tls_with_the_ca_file_forwards(
    tls_mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    deliver(tls_mailbox)
    await forward_once(make_settings(**imaps(tls_mailbox, tls_ca_file=tls_mailbox.ca_file)))
    assert len(smtp_sink.received) == 1


async def test_imap_starttls_with_the_ca_file_forwards_and_logs_in_only_after_tls(
    tls_mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    deliver(tls_mailbox)
    with FaultProxy(tls_mailbox.host, tls_mailbox.imap_port, record=True) as proxy:
        settings = make_settings(
            imap_host=proxy.host,
            imap_port=proxy.port,
            imap_security="starttls",
            tls_ca_file=tls_mailbox.ca_file,
        )
        await forward_once(settings)
        sent = proxy.recorded("client")
    assert len(smtp_sink.received) == 1
    assert cleartext(sent).endswith(b"STARTTLS\r\n")
    assert b"LOGIN" not in cleartext(sent).upper()
    assert tls_mailbox.password.encode() not in sent


async def test_imap_starttls_without_the_ca_file_is_refused_naming_the_setting(
    tls_mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    deliver(tls_mailbox)
    settings = make_settings(
        imap_host=tls_mailbox.host, imap_port=tls_mailbox.imap_port, imap_security="starttls"
    )
    with pytest.raises(ForwarderError) as error:
        await forward_once(settings)
    assert "FORWARDER_TLS_CA_FILE" in str(error.value)
    assert smtp_sink.received == []


async def test_imap_starttls_against_a_server_without_it_is_refused_without_logging_in(
    mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    deliver(mailbox)  # the plain Dovecot: ssl = no, STARTTLS not offered
    with FaultProxy(mailbox.host, mailbox.imap_port, record=True) as proxy:
        settings = make_settings(
            imap_host=proxy.host, imap_port=proxy.port, imap_security="starttls"
        )
        with pytest.raises(ForwarderError) as error:
            await forward_once(settings)
        sent = proxy.recorded("client")
    assert "STARTTLS" in str(error.value)
    assert f"{proxy.host}:{proxy.port}" in str(error.value)
    assert mailbox.password.encode() not in sent
    assert b"LOGIN" not in sent.upper() and b"AUTHENTICATE" not in sent.upper()
    assert smtp_sink.received == []


# --------------------------------------------------------------------------- SMTP


@pytest.fixture
def auth_starttls_sink() -> Iterator[SmtpSink]:
    with SmtpSink(auth=(SMTP_USER, SMTP_PASSWORD), tls="starttls", require_starttls=True) as sink:
        yield sink


def smtp(sink: SmtpSink, proxy: FaultProxy | None = None, **overrides: object) -> dict[str, object]:
    return {
        "smtp_host": sink.host,
        "smtp_port": proxy.port if proxy else sink.port,
        "smtp_security": "starttls",
        "smtp_username": SMTP_USER,
        "smtp_password": SMTP_PASSWORD,
        **overrides,
    }


async def test_smtp_starttls_with_the_ca_file_forwards_over_tls(
    mailbox: MailServer, auth_starttls_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    deliver(mailbox)
    sink = auth_starttls_sink
    with FaultProxy(sink.host, sink.port, record=True) as proxy:
        await forward_once(make_settings(**smtp(sink, proxy, tls_ca_file=sink.ca_file)))
        sent = proxy.recorded("client")
    [received] = sink.received
    assert received.tls and received.auth_login == SMTP_USER
    assert cleartext(sent).endswith(b"STARTTLS\r\n")
    assert b"AUTH" not in cleartext(sent).upper()
    assert SMTP_PASSWORD.encode() not in sent


async def test_smtp_starttls_without_the_ca_file_is_refused_naming_the_setting(
    mailbox: MailServer, auth_starttls_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    deliver(mailbox)
    with pytest.raises(ForwarderError) as error:
        await forward_once(make_settings(**smtp(auth_starttls_sink)))
    message = str(error.value)
    assert "certificate" in message.lower() and "FORWARDER_TLS_CA_FILE" in message
    assert f"{auth_starttls_sink.host}:{auth_starttls_sink.port}" in message
    assert auth_starttls_sink.received == []
    [(_, flags, _)] = mailbox.messages()
    assert flags == set()


@pytest.mark.parametrize(
    "sink_options",
    [
        pytest.param({}, id="server-without-tls"),
        pytest.param({"tls": "starttls", "offer_starttls": False}, id="starttls-stripped"),
    ],
)
async def test_smtp_starttls_not_offered_is_refused_without_plaintext_fallback(
    mailbox: MailServer, make_settings: MakeSettings, sink_options: dict[str, Any]
) -> None:
    deliver(mailbox)
    with (
        SmtpSink(auth=(SMTP_USER, SMTP_PASSWORD), **sink_options) as sink,
        FaultProxy(sink.host, sink.port, record=True) as proxy,
    ):
        settings = make_settings(**smtp(sink, proxy, tls_ca_file=sink.ca_file))
        with pytest.raises(ForwarderError) as error:
            await forward_once(settings)
        sent = proxy.recorded("client")
        commands = list(sink.commands)
    message = str(error.value)
    assert "STARTTLS" in message and f"{proxy.host}:{proxy.port}" in message
    assert b"AUTH" not in sent.upper() and b"MAIL FROM" not in sent.upper()
    assert "MAIL" not in commands
    [(_, flags, _)] = mailbox.messages()
    assert flags == set()


async def test_smtp_implicit_tls_with_the_ca_file_forwards_over_tls(
    mailbox: MailServer, make_settings: MakeSettings
) -> None:
    deliver(mailbox)
    with SmtpSink(tls="implicit") as sink:
        settings = make_settings(
            smtp_host=sink.host,
            smtp_port=sink.port,
            smtp_security="tls",
            tls_ca_file=sink.ca_file,
        )
        await forward_once(settings)
        [received] = sink.received
    assert received.tls


async def test_smtp_implicit_tls_without_the_ca_file_is_refused_naming_the_setting(
    mailbox: MailServer, make_settings: MakeSettings
) -> None:
    deliver(mailbox)
    with SmtpSink(tls="implicit") as sink:
        settings = make_settings(smtp_host=sink.host, smtp_port=sink.port, smtp_security="tls")
        with pytest.raises(ForwarderError) as error:
            await forward_once(settings)
        assert sink.received == []
    assert "FORWARDER_TLS_CA_FILE" in str(error.value)


async def test_smtp_starttls_not_offered_error_says_which_setting_to_change(
    mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    deliver(mailbox)
    with pytest.raises(ForwarderError) as error:
        await forward_once(make_settings(smtp_security="starttls"))
    assert "FORWARDER_SMTP_SECURITY" in str(error.value)
