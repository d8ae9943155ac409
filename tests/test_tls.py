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

import functools
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forwarder.config import Settings
from forwarder.errors import ForwarderError
from tests.conftest import MakeSettings, forward_once, imap_source
from tests.faults import FaultProxy
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink, self_signed_certificate

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


def expired_certificate(directory: Path, host: str) -> Path:
    """``cert.pem``/``key.pem`` in ``directory``: a self-signed certificate for ``host``
    that expired in 2020 (``openssl ca`` is the one that takes explicit dates)."""
    (directory / "index.txt").write_text("")
    (directory / "serial").write_text("01\n")
    (directory / "ca.cnf").write_text(
        "[ca]\ndefault_ca = it\n[it]\ndir = .\ndatabase = index.txt\nserial = serial\n"
        "new_certs_dir = .\ndefault_md = sha256\npolicy = any\ncopy_extensions = copy\n"
        "unique_subject = no\n[any]\ncommonName = supplied\n"
    )
    run = functools.partial(subprocess.run, cwd=directory, check=True, capture_output=True)
    san = f"subjectAltName=DNS:localhost,IP:{host}"
    run(
        shlex.split(
            "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
            f"-subj /CN=localhost -addext {san} -keyout key.pem -out request.pem"
        )
    )
    run(
        shlex.split(
            "openssl ca -batch -config ca.cnf -selfsign -keyfile key.pem -in request.pem "
            "-out cert.pem -startdate 20200101000000Z -enddate 20200102000000Z"
        )
    )
    (directory / "key.pem").chmod(0o600)
    return directory / "cert.pem"


class ExpiredCertificateMailServer(MailServer):
    """A TLS Dovecot whose certificate expired long ago."""

    def _make_certificate(self) -> Path:
        return expired_certificate(self.base_dir, self.host)


def imap_error(settings: Settings) -> ForwarderError:
    source = imap_source(settings)
    with pytest.raises(ForwarderError) as error:
        source.connect()
    assert not source.connected
    return error.value


@pytest.mark.parametrize("security", ["starttls", "none"])
def test_imap_plain_client_on_an_implicit_tls_port_says_to_use_tls(
    security: str, tls_mailbox: MailServer, make_settings: MakeSettings
) -> None:
    settings = make_settings(
        imap_port=tls_mailbox.imaps_port, imap_security=security, imap_timeout=1
    )
    error = imap_error(settings)  # waits imap_timeout (bounded by GREETING_TIMEOUT) at most
    assert "expects TLS" in str(error) and "FORWARDER_IMAP_SECURITY=tls" in str(error)
    assert "FORWARDER_TLS_CA_FILE" not in str(error)


def test_imap_tls_client_on_a_plain_port_says_it_speaks_plain_imap(
    mailbox: MailServer, make_settings: MakeSettings
) -> None:
    error = imap_error(make_settings(imap_security="tls"))
    assert "plain IMAP" in str(error) and "FORWARDER_IMAP_SECURITY=starttls" in str(error)
    assert "WRONG_VERSION_NUMBER" not in str(error)


def test_imap_certificate_of_another_ca_than_the_ca_file_says_so(
    tls_mailbox: MailServer, make_settings: MakeSettings, tmp_path: Path
) -> None:
    other_ca, _key = self_signed_certificate(tmp_path)
    error = imap_error(make_settings(**imaps(tls_mailbox, tls_ca_file=other_ca)))
    assert "not trusted" in str(error) and str(other_ca) in str(error)
    assert "set FORWARDER_TLS_CA_FILE" not in str(error)


def test_imap_certificate_for_another_host_name_says_to_use_its_name(
    tls_mailbox: MailServer, make_settings: MakeSettings
) -> None:
    assert tls_mailbox.imaps_port is not None
    proxy = FaultProxy(tls_mailbox.host, tls_mailbox.imaps_port)
    proxy.host = "127.0.0.2"  # an address the certificate does not name
    with proxy:
        settings = make_settings(
            **imaps(tls_mailbox, imap_host=proxy.host, imap_port=proxy.port),
            tls_ca_file=tls_mailbox.ca_file,
        )
        error = imap_error(settings)
    assert "not valid for the name '127.0.0.2'" in str(error)
    assert "FORWARDER_IMAP_HOST" in str(error) and "FORWARDER_TLS_CA_FILE" not in str(error)


def test_imap_expired_certificate_says_it_expired(make_settings: MakeSettings) -> None:
    with ExpiredCertificateMailServer(tls=True) as server:
        settings = make_settings(**imaps(server, tls_ca_file=server.ca_file))
        error = imap_error(settings)
    assert "expired" in str(error) and "FORWARDER_TLS_CA_FILE" not in str(error)


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
