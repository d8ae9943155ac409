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

from imapclient import IMAPClient
from imapclient.exceptions import LoginError
from imapclient.imapclient import SocketTimeout

from forwarder import imap_errors
from forwarder.config import Settings
from forwarder.errors import ImapError
from forwarder.imap_fetch import server_text
from forwarder.tls import certificate_problem, tls_context

GREETING_TIMEOUT = 10.0  # seconds for TCP, TLS and the greeting (FORWARDER_IMAP_TIMEOUT if less)


def open_session(settings: Settings, server: str) -> IMAPClient:
    """A logged-in IMAP session (no folder selected yet)."""
    client = _open(settings, server)
    try:
        if settings.imap_security == "starttls":
            _starttls(client, settings, server)
        _login(client, settings, server)
    except BaseException:
        with contextlib.suppress(Exception):  # the session is of no use any more
            client.shutdown()
        raise
    return client


def _open(s: Settings, server: str) -> IMAPClient:
    bound = min(s.imap_timeout, GREETING_TIMEOUT)
    try:
        client = IMAPClient(
            s.imap_host,
            port=s.imap_port_effective,
            ssl=s.imap_security == "tls",
            ssl_context=tls_context(s, s.imap_security),
            timeout=SocketTimeout(connect=bound, read=s.imap_timeout),
        )
    except TimeoutError:
        tls = None if s.imap_security == "tls" else _speaks_tls(s, bound)
        raise imap_errors.no_greeting(server, bound, speaks_tls=tls) from None
    except imaplib.IMAP4.error as exc:  # imaplib raises with the greeting line itself
        raise imap_errors.greeting_refused(server, server_text(exc)) from None
    client.normalise_times = False  # INTERNALDATE with its timezone
    return client


def _speaks_tls(s: Settings, timeout: float) -> bool | None:
    """Whether the port completes a TLS handshake (certificates not checked: nothing but
    the handshake is sent). None if not even a TCP connection could be made."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE
    try:
        raw = socket.create_connection((s.imap_host, s.imap_port_effective), timeout)
    except OSError:
        return None
    try:
        with probe.wrap_socket(raw, server_hostname=s.imap_host):
            return True
    except OSError:
        return False
    finally:
        raw.close()


def _starttls(client: IMAPClient, s: Settings, server: str) -> None:
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
    client.starttls(tls_context(s, "starttls"))


def _login(client: IMAPClient, s: Settings, server: str) -> None:
    try:
        client.login(s.imap_username, s.imap_password.get_secret_value())
    except LoginError as exc:
        cause = exc.__context__  # imapclient re-raises imaplib's error as LoginError
        bye = isinstance(cause, imaplib.IMAP4.abort)
        if bye and "socket error" in str(cause):  # imaplib's words for EOF: no BYE
            raise ImapError("the connection closed during the login", server=server) from None
        text = server_text(exc)
        raise imap_errors.login_refused(server, s.imap_username, text, bye=bye) from None


def connection_failure(exc: BaseException, s: Settings, server: str) -> ImapError:
    """The ImapError for a socket, TLS or protocol failure."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        problem = certificate_problem(
            exc, host=s.imap_host, host_setting="FORWARDER_IMAP_HOST", ca_file=s.tls_ca_file
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
            f"no answer within {s.imap_timeout:g} s; the server is unreachable or too slow",
            server=server,
            settings=("FORWARDER_IMAP_TIMEOUT",),
        )
    text = server_text(exc) or type(exc).__name__
    return ImapError(f"{text} ({type(exc).__name__})", server=server)
