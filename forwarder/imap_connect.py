"""Opening an IMAP session: TCP, TLS (implicit or STARTTLS), greeting and login, with errors
that say what to change (`forwarder.imap_errors` writes them).

The greeting is awaited at most GREETING_TIMEOUT seconds (FORWARDER_IMAP_TIMEOUT if
less): a plain client on an implicit-TLS port waits for a greeting that never comes,
and a TLS probe then tells the person which setting to change.
"""

from __future__ import annotations

import contextlib
import imaplib
import socket
import ssl
from pathlib import Path

from imapclient import IMAPClient
from imapclient.exceptions import LoginError
from imapclient.imapclient import SocketTimeout

from forwarder import imap_errors
from forwarder.errors import ImapError
from forwarder.imap_fetch import server_text
from forwarder.mailbox import ImapEndpoint
from forwarder.tls import certificate_problem, tls_context

GREETING_TIMEOUT = 10.0  # seconds for TCP, TLS and the greeting (FORWARDER_IMAP_TIMEOUT if less)


def open_session(endpoint: ImapEndpoint, ca_file: Path | None) -> IMAPClient:
    """A logged-in IMAP session (no folder selected yet)."""
    server = endpoint.server
    client = _open(endpoint, ca_file, server)
    try:
        if endpoint.security == "starttls":
            _starttls(client, ca_file, server)
        _login(client, endpoint, server)
    except BaseException:
        with contextlib.suppress(Exception):  # the session is of no use any more
            client.shutdown()
        raise
    return client


def _open(e: ImapEndpoint, ca_file: Path | None, server: str) -> IMAPClient:
    bound = min(e.timeout, GREETING_TIMEOUT)
    try:
        client = IMAPClient(
            e.host,
            port=e.port,
            ssl=e.security == "tls",
            ssl_context=tls_context(ca_file, e.security),
            timeout=SocketTimeout(connect=bound, read=e.timeout),
        )
    except TimeoutError:
        tls = _speaks_tls(e, bound)  # None: not even TCP
        if e.security == "tls" and tls:
            tls = False  # TLS worked, then no greeting: nothing to do with the port's TLS
        raise imap_errors.no_greeting(server, bound, speaks_tls=tls) from None
    except imaplib.IMAP4.error as exc:  # imaplib raises with the greeting line itself
        raise imap_errors.greeting_refused(server, server_text(exc)) from None
    client.normalise_times = False  # INTERNALDATE with its timezone
    return client


def _speaks_tls(e: ImapEndpoint, timeout: float) -> bool | None:
    """Whether the port completes a TLS handshake (certificates not checked: nothing but
    the handshake is sent). None if not even a TCP connection could be made."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE
    try:
        raw = socket.create_connection((e.host, e.port), timeout)
    except OSError:
        return None
    try:
        with probe.wrap_socket(raw, server_hostname=e.host):
            return True
    except OSError:
        return False
    finally:
        raw.close()


def _starttls(client: IMAPClient, ca_file: Path | None, server: str) -> None:
    if b"PREAUTH" in (client.welcome or b"").upper()[:20]:
        raise ImapError(
            "greeted with PREAUTH, so STARTTLS cannot be negotiated; refusing to go on without TLS",
            server=server,
        )
    if b"STARTTLS" not in client.capabilities():
        raise ImapError(
            "STARTTLS is not offered; refusing to log in without TLS",
            server=server,
            advice="use FORWARDER_IMAP_SECURITY=tls if it has IMAPS",
        )
    client.starttls(tls_context(ca_file, "starttls"))


def _login(client: IMAPClient, e: ImapEndpoint, server: str) -> None:
    try:
        _authenticate(client, e)
    except LoginError as exc:
        cause = exc.__context__  # imapclient re-raises imaplib's error as LoginError
        bye = isinstance(cause, imaplib.IMAP4.abort)
        if bye and "socket error" in str(cause):  # imaplib's words for EOF: no BYE
            raise ImapError("the connection closed during the login", server=server) from None
        text = server_text(exc)
        raise imap_errors.login_refused(server, e.username, text, bye=bye) from None


def _authenticate(client: IMAPClient, e: ImapEndpoint) -> None:
    """LOGIN; AUTHENTICATE PLAIN (RFC 4616: UTF-8) when the credentials are not ASCII.

    LOGIN's strings are 7-bit (RFC 3501) and imaplib encodes them as ASCII. ASCII
    credentials keep LOGIN, the command every server has been used with so far.
    """
    username, password = e.username, e.password.get_secret_value()
    if username.isascii() and password.isascii():
        client.login(username, password)
    elif b"AUTH=PLAIN" in client.capabilities():
        client.plain_login(username, password)
    else:
        non_ascii = [not username.isascii(), not password.isascii()]
        raise imap_errors.no_utf8_login(e.server, non_ascii)


def connection_failure(exc: BaseException, e: ImapEndpoint, ca_file: Path | None) -> ImapError:
    """The ImapError for a socket, TLS or protocol failure."""
    server = e.server
    if isinstance(exc, ssl.SSLCertVerificationError):
        problem = certificate_problem(
            exc, host=e.host, host_setting="FORWARDER_IMAP_HOST", ca_file=ca_file
        )
        return ImapError(
            problem.detail, server=server, advice=problem.advice, settings=problem.settings
        )
    if isinstance(exc, ssl.SSLError) and exc.reason == "WRONG_VERSION_NUMBER":
        return imap_errors.plain_port_for_tls(server)
    if isinstance(exc, ConnectionRefusedError):
        return ImapError(
            "connection refused",
            server=server,
            settings=("FORWARDER_IMAP_HOST", "FORWARDER_IMAP_PORT"),
        )
    if isinstance(exc, socket.gaierror):
        return ImapError(
            f"host name not found ({exc.strerror})",
            server=server,
            settings=("FORWARDER_IMAP_HOST",),
        )
    if isinstance(exc, TimeoutError):
        return ImapError(
            f"no answer within {e.timeout:g} s; the server is unreachable or too slow",
            server=server,
            settings=("FORWARDER_IMAP_TIMEOUT",),
        )
    text = server_text(exc) or type(exc).__name__
    return ImapError(f"{text} ({type(exc).__name__})", server=server)
