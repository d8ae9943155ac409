"""SMTP errors a person can act on: each names the server, the likely cause and the variable.

Real servers: the aiosmtpd sink (plain, STARTTLS, implicit TLS), an aiosmtpd
server with a certificate made for the case (another host name, expired), and a
listening socket that never greets, as a port expecting TLS first looks to a
plain client.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtplib import SMTPAuthenticationError

from forwarder.config import Settings
from forwarder.errors import EXIT_AUTH, EXIT_RUNTIME, SmtpAuthError, SmtpError
from forwarder.smtp_errors import auth_error
from forwarder.smtp_relay import SmtpRelay
from tests.conftest import MakeSettings
from tests.servers import LOOPBACK, SmtpSink, free_port, self_signed_certificate

SMTP_USER = "relay@example.org"


async def connect_error(settings: Settings) -> SmtpError:
    relay = SmtpRelay(settings.mailboxes()[0].smtp, settings.tls_ca_file)
    try:
        with pytest.raises(SmtpError) as error:
            await relay.connect()
    finally:
        await relay.close()
    assert "\n" not in str(error.value)
    return error.value


def smtp(host: str, port: int, security: str, **overrides: object) -> dict[str, object]:
    return {"smtp_host": host, "smtp_port": port, "smtp_security": security, **overrides}


@contextmanager
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel completes them) and never says a word."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@contextmanager
def tls_server(cert: Path, key: Path, *, starttls: bool = False) -> Iterator[int]:
    """An aiosmtpd server with this certificate: TLS from the first byte, or STARTTLS."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    tls = {"tls_context": context} if starttls else {"ssl_context": context}
    controller = Controller(object(), hostname=LOOPBACK, port=free_port(), **tls)
    controller.start()
    try:
        yield controller.port
    finally:
        controller.stop()


def certificate_for(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / "other.pem", directory / "other.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def expired_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 that was valid on 1 January 2020 only."""
    key, request, cert = directory / "key.pem", directory / "req.csr", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(request)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (directory / "index.txt").write_text("")
    (directory / "serial").write_text("01\n")
    (directory / "ca.cnf").write_text(
        "[ca]\ndefault_ca = old\n[old]\ndatabase = index.txt\nnew_certs_dir = .\n"
        "serial = serial\ndefault_md = sha256\npolicy = any\ncopy_extensions = copy\n"
        "[any]\ncommonName = supplied\n"
    )
    subprocess.run(
        ["openssl", "ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile", str(key),
         "-in", str(request), "-out", str(cert),
         "-startdate", "20200101000000Z", "-enddate", "20200102000000Z"],
        check=True,
        capture_output=True,
        cwd=directory,
    )  # fmt: skip
    return cert, key


# --------------------------------------------------------------------------- reaching the server


async def test_connection_refused_names_the_host_and_port_settings(
    make_settings: MakeSettings,
) -> None:
    port = free_port()  # nothing listens there
    error = await connect_error(make_settings(**smtp(LOOPBACK, port, "none")))
    message = str(error)
    assert f"SMTP server {LOOPBACK}:{port}: connection refused" in message
    assert "FORWARDER_SMTP_HOST" in message and "FORWARDER_SMTP_PORT" in message
    assert error.exit_status == EXIT_RUNTIME


async def test_unknown_host_name_names_the_host_setting(make_settings: MakeSettings) -> None:
    error = await connect_error(make_settings(**smtp("no-such-host.invalid", 587, "none")))
    assert "host name no-such-host.invalid not found" in str(error)
    assert error.settings == ("FORWARDER_SMTP_HOST",)


async def test_smtp_timeout_bounds_the_wait_for_the_greeting(make_settings: MakeSettings) -> None:
    with silent_port() as port:
        error = await connect_error(make_settings(**smtp(LOOPBACK, port, "none", smtp_timeout=0.3)))
    assert "no greeting within 0.3 s" in str(error)


async def test_starttls_against_an_implicit_tls_port_suggests_security_tls(
    make_settings: MakeSettings,
) -> None:
    with SmtpSink(tls="implicit") as sink:
        settings = make_settings(
            **smtp(sink.host, sink.port, "starttls", smtp_timeout=0.3, tls_ca_file=sink.ca_file)
        )
        error = await connect_error(settings)
    assert "FORWARDER_SMTP_SECURITY=tls" in str(error)
    assert "implicit TLS" in str(error)


async def test_tls_against_a_plain_port_suggests_starttls(
    smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    error = await connect_error(make_settings(**smtp(smtp_sink.host, smtp_sink.port, "tls")))
    message = str(error)
    assert "plain" in message and "FORWARDER_SMTP_SECURITY=starttls" in message
    assert "WRONG_VERSION_NUMBER" not in message


async def test_a_login_without_auth_offered_names_the_username_setting(
    smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    settings = make_settings(smtp_username=SMTP_USER, smtp_password="secret")
    error = await connect_error(settings)
    assert "offers no AUTH" in str(error) and "FORWARDER_SMTP_USERNAME" in str(error)


# --------------------------------------------------------------------------- certificates


async def test_untrusted_certificate_suggests_the_ca_file_setting_when_unset(
    make_settings: MakeSettings,
) -> None:
    with SmtpSink(tls="implicit") as sink:
        error = await connect_error(make_settings(**smtp(sink.host, sink.port, "tls")))
    assert "not trusted" in str(error)
    assert "set FORWARDER_TLS_CA_FILE" in str(error)


async def test_untrusted_certificate_with_a_ca_file_set_says_it_is_not_the_issuer(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    other_ca, _ = self_signed_certificate(tmp_path)  # a valid file, but not this server's CA
    with SmtpSink(tls="implicit") as sink:
        settings = make_settings(**smtp(sink.host, sink.port, "tls", tls_ca_file=other_ca))
        error = await connect_error(settings)
    message = str(error)
    assert f"signed neither by the CA in {other_ca}" in message
    assert "set FORWARDER_TLS_CA_FILE" not in message
    assert error.settings == ("FORWARDER_TLS_CA_FILE",)


async def test_certificate_for_another_name_says_so_without_the_ca_hint(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    cert, key = certificate_for(tmp_path, "mx.example.test")
    with tls_server(cert, key) as port:
        error = await connect_error(
            make_settings(**smtp(LOOPBACK, port, "tls", tls_ca_file=cert))
        )
    message = str(error)
    assert f"not valid for the name {LOOPBACK!r}" in message
    assert "FORWARDER_TLS_CA_FILE" not in message
    assert error.settings == ("FORWARDER_SMTP_HOST",)


async def test_expired_certificate_says_so_without_the_ca_hint(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    cert, key = expired_certificate(tmp_path)
    with tls_server(cert, key) as port:
        error = await connect_error(
            make_settings(**smtp(LOOPBACK, port, "tls", tls_ca_file=cert))
        )
    message = str(error)
    assert "has expired" in message
    assert "FORWARDER_TLS_CA_FILE" not in message


async def test_starttls_certificate_errors_are_described_the_same_way(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    cert, key = certificate_for(tmp_path, "mx.example.test")
    with tls_server(cert, key, starttls=True) as port:
        error = await connect_error(
            make_settings(**smtp(LOOPBACK, port, "starttls", tls_ca_file=cert))
        )
    assert f"not valid for the name {LOOPBACK!r}" in str(error)


async def test_starttls_untrusted_certificate_with_a_ca_file_set(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    (tmp_path / "ca").mkdir()
    other_ca, _ = self_signed_certificate(tmp_path / "ca")
    cert, key = self_signed_certificate(tmp_path)
    with tls_server(cert, key, starttls=True) as port:
        error = await connect_error(
            make_settings(**smtp(LOOPBACK, port, "starttls", tls_ca_file=other_ca))
        )
    assert f"signed neither by the CA in {other_ca}" in str(error)


# --------------------------------------------------------------------------- login


def test_a_temporary_login_failure_is_retried_not_final() -> None:
    exc = SMTPAuthenticationError(454, "4.7.0 Temporary authentication failure")
    error = auth_error(exc, server="SMTP server mx:587", username=SMTP_USER)
    assert not isinstance(error, SmtpAuthError)
    assert error.exit_status == EXIT_RUNTIME


def test_a_refused_login_is_final_and_names_both_settings() -> None:
    exc = SMTPAuthenticationError(535, "5.7.8 Error: authentication failed")
    error = auth_error(exc, server="SMTP server mx:587", username=SMTP_USER)
    assert isinstance(error, SmtpAuthError) and error.exit_status == EXIT_AUTH
    assert error.settings == ("FORWARDER_SMTP_USERNAME", "FORWARDER_SMTP_PASSWORD")
