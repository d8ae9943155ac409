"""SMTP failures turned into errors a person can act on: the cause, and the setting to change.

aiosmtplib wraps what went wrong while connecting in `SMTPConnectError` (the
cause in `__cause__`); STARTTLS raises `ssl` errors as they are. Each is
mapped here to an `SmtpError` whose fields say what happened (`detail`), the
likely cause and remedy (`advice`) and which variables to check (`settings`):

| What happened                                   | Said                                       |
|-------------------------------------------------|--------------------------------------------|
| connection refused                              | check FORWARDER_SMTP_HOST and _PORT        |
| host name not found                             | check FORWARDER_SMTP_HOST                  |
| no answer to the connection                     | firewall or host down; HOST and PORT       |
| connected, no greeting (`starttls` or `none`)   | the port expects TLS: SECURITY=tls         |
| `tls`, and the server answered in plain text    | the port speaks plain SMTP: SECURITY=starttls |
| certificate for another name / expired / untrusted | see `forwarder.tls.certificate_problem` |
| greeting other than 220                         | the server's reply                         |

A refusal of the forwarder itself during a transaction (`forwarder.replies`)
becomes `SubmissionRefused`, naming the envelope sender or login settings.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPReadTimeoutError,
    SMTPResponseException,
    SMTPServerDisconnected,
)

from forwarder.errors import SmtpAuthError, SmtpError, SubmissionRefused
from forwarder.replies import Concern, Reply
from forwarder.tls import certificate_problem

HOST = "FORWARDER_SMTP_HOST"
PORT = "FORWARDER_SMTP_PORT"
SECURITY = "FORWARDER_SMTP_SECURITY"
USERNAME = "FORWARDER_SMTP_USERNAME"
PASSWORD = "FORWARDER_SMTP_PASSWORD"
TIMEOUT = "FORWARDER_SMTP_TIMEOUT"
ENVELOPE_SENDER = "FORWARDER_ENVELOPE_SENDER"


def connect_error(
    exc: BaseException,
    *,
    server: str,
    host: str,
    security: str,
    timeout: float,
    ca_file: Path | None,
) -> SmtpError:
    """The error for a failure while connecting, greeting, STARTTLS or EHLO."""
    cause = exc.__cause__ if isinstance(exc, SMTPConnectError) else exc
    if isinstance(exc, SMTPConnectTimeoutError):
        if isinstance(exc.__cause__, SMTPReadTimeoutError):  # connected; no 220 greeting
            if security != "tls":
                return SmtpError(
                    f"connected, but no greeting within {timeout:g} s",
                    server=server,
                    advice="the port probably expects TLS from the first byte (implicit TLS, "
                    "usually port 465): set FORWARDER_SMTP_SECURITY=tls",
                    settings=(SECURITY, PORT),
                )
            return SmtpError(
                f"TLS established, but no greeting within {timeout:g} s",
                server=server,
                advice="the server is overloaded, or this port is not SMTP",
                settings=(PORT, TIMEOUT),
            )
        return SmtpError(
            f"no answer to the connection within {timeout:g} s",
            server=server,
            advice="the host is down or a firewall drops the connection",
            settings=(HOST, PORT, TIMEOUT),
        )
    if isinstance(exc, SMTPConnectResponseError):
        return SmtpError(
            f"refused the connection: {exc.code} {_one_line(exc.message)}",
            server=server,
            code=exc.code,
            advice="the server does not accept this client now; see its reply",
        )
    if isinstance(cause, ConnectionRefusedError):
        return SmtpError(
            "connection refused",
            server=server,
            advice="nothing listens there: is the server running, on this port?",
            settings=(HOST, PORT),
        )
    if isinstance(cause, socket.gaierror):
        return SmtpError(
            f"host name {host} not found ({cause.strerror})", server=server, settings=(HOST,)
        )
    if isinstance(cause, ssl.SSLCertVerificationError):
        problem = certificate_problem(cause, host=host, host_setting=HOST, ca_file=ca_file)
        return SmtpError(
            problem.detail, server=server, advice=problem.advice, settings=problem.settings
        )
    if isinstance(cause, ssl.SSLError) and cause.reason == "WRONG_VERSION_NUMBER":
        return SmtpError(
            "the server answered in plain text, not TLS",
            server=server,
            advice="this port speaks plain SMTP: set FORWARDER_SMTP_SECURITY=starttls "
            "(usually port 587), or use its implicit-TLS port (465)",
            settings=(SECURITY, PORT),
        )
    if isinstance(cause, SMTPServerDisconnected):
        closed = "before its greeting" if isinstance(exc, SMTPConnectError) else "at once"
        return SmtpError(
            f"the server closed the connection {closed}",
            server=server,
            advice="it may refuse this client, or expect TLS from the first byte",
            settings=(SECURITY, PORT),
        )
    return transaction_error(exc, server=server)


def auth_error(exc: SMTPAuthenticationError, *, server: str, username: str) -> SmtpError:
    """A refused login is final (exit 3); a temporary failure (4xx) is retried."""
    text = f"{exc.code} {_one_line(exc.message)}"
    if 400 <= exc.code < 500:
        return SmtpError(
            f"the login of {username} failed for now ({text})",
            server=server,
            code=exc.code,
            advice="the server's authentication service is unavailable; tried again later",
        )
    return SmtpAuthError(
        f"refused the login of {username} ({text})",
        server=server,
        code=exc.code,
        settings=(USERNAME, PASSWORD),
    )


def submission_refused(
    reply: Reply, *, server: str, mail_from: str, logged_in: bool
) -> SubmissionRefused:
    """A refusal of the forwarder itself (`replies.Concern`): what to change, and where."""
    said = f"{reply.code} {_one_line(reply.text)}"
    due = "the members stay due and get the message once this is fixed"
    about = reply.about
    if about is Concern.LOGIN:
        return SubmissionRefused(
            f"refuses to send without a login ({said})",
            server=server,
            code=reply.code,
            advice=f"it sends only for logged-in clients, over TLS; {due}",
            settings=(USERNAME, PASSWORD, SECURITY),
        )
    if about is Concern.RELAY:
        return SubmissionRefused(
            f"does not relay for this connection ({said})",
            server=server,
            code=reply.code,
            advice="use the organization's submission server (port 587) with a login "
            f"allowed to send to other domains; {due}",
            settings=(HOST, USERNAME),
        )
    return SubmissionRefused(
        f"refused the envelope sender {mail_from} ({said})",
        server=server,
        code=reply.code,
        advice="allow the login to send as this address on the server (Postfix: "
        f"smtpd_sender_login_maps) or change the envelope sender; {due}",
        settings=(ENVELOPE_SENDER, USERNAME) if logged_in else (ENVELOPE_SENDER,),
    )


def transaction_error(exc: BaseException, *, server: str) -> SmtpError:
    """A failure during a transaction or a command: the link or the server's reply."""
    if isinstance(exc, SMTPResponseException):
        return SmtpError(f"{exc.code} {_one_line(exc.message)}", server=server, code=exc.code)
    if isinstance(exc, SMTPServerDisconnected):
        return SmtpError(f"the connection was lost ({_one_line(str(exc))})", server=server)
    return SmtpError(_one_line(str(exc)) or type(exc).__name__, server=server)


def _one_line(text: str) -> str:
    return " ".join(text.split())
