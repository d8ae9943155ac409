"""Opening a session with the submission server: TCP or TLS, EHLO, STARTTLS, AUTH.

Every failure becomes an `SmtpError` that names the cause and the variable to
check (`forwarder.smtp_errors`). Each step waits at most
min(FORWARDER_SMTP_TIMEOUT, 60 s). The EHLO name is `FORWARDER_SMTP_HELO_NAME`,
else the machine's fully-qualified name, else the address literal of the
connection's own end (`forwarder.esmtp.ehlo_name`).
"""

from __future__ import annotations

import asyncio
import functools
import socket
from pathlib import Path

import aiosmtplib
from aiosmtplib import SMTPAuthenticationError, SMTPException, SMTPHeloError

from forwarder.errors import SmtpError
from forwarder.esmtp import ehlo_name
from forwarder.mailbox import SmtpEndpoint
from forwarder.smtp_errors import SECURITY, USERNAME, auth_error, connect_error
from forwarder.tls import tls_context

CONNECT_TIMEOUT = 60.0  # RFC 5321 4.5.3.2: 5 minutes for most commands; connecting is quicker
HELO_NAME = "FORWARDER_SMTP_HELO_NAME"


@functools.cache
def machine_fqdn() -> str:
    return socket.getfqdn()  # may ask the DNS: asked once per process, in a thread


async def open_session(
    endpoint: SmtpEndpoint, ca_file: Path | None, timeout: float
) -> tuple[aiosmtplib.SMTP, str]:
    """A connected, greeted, encrypted (unless `none`) and logged-in session, and the
    name it gave in EHLO."""
    s, server = endpoint, endpoint.server
    fqdn = s.helo_name
    if fqdn is None:
        fqdn = await asyncio.to_thread(machine_fqdn)
    smtp = aiosmtplib.SMTP(
        hostname=s.host,
        port=s.port,
        use_tls=s.security == "tls",
        start_tls=False,  # done below, so that a missing STARTTLS gets a clear error
        tls_context=tls_context(ca_file, s.security),
        timeout=timeout,
        local_hostname=fqdn,  # keeps aiosmtplib from asking the DNS again
    )
    name = fqdn
    try:
        await smtp.connect()
        sockname = smtp.get_transport_info("sockname")
        name = ehlo_name(s.helo_name, fqdn, sockname[0] if sockname else None)
        await smtp.ehlo(hostname=name)  # SIZE, 8BITMIME, STARTTLS known now
        if s.security == "starttls":
            if not smtp.supports_extension("starttls"):
                raise SmtpError(
                    "STARTTLS is not offered; refusing to send without TLS",
                    server=server,
                    advice="use FORWARDER_SMTP_SECURITY=tls if it has SMTPS on port 465",
                    settings=(SECURITY,),
                )
            await smtp.starttls()
            await smtp.ehlo(hostname=name)
        if s.username:
            if not smtp.supports_extension("auth"):
                raise SmtpError(
                    "the server offers no AUTH, so FORWARDER_SMTP_USERNAME cannot log in",
                    server=server,
                    advice="use the submission port (587, with TLS) or leave the username "
                    "unset for a server that needs no login",
                    settings=(USERNAME, SECURITY),
                )
            password = s.password.get_secret_value() if s.password else ""
            await smtp.login(s.username, password)
    except SmtpError:
        smtp.close()
        raise
    except SMTPAuthenticationError as exc:
        smtp.close()
        raise auth_error(exc, server=server, username=s.username or "") from None
    except SMTPHeloError as exc:
        smtp.close()
        raise SmtpError(
            f"refused our EHLO {name} ({exc.code} {' '.join(exc.message.split())})",
            server=server,
            code=exc.code,
            advice="set the name this machine is known by",
            settings=(HELO_NAME,),
        ) from None
    except (TimeoutError, SMTPException, OSError) as exc:
        smtp.close()
        raise connect_error(
            exc,
            server=server,
            host=s.host,
            security=s.security,
            timeout=timeout,
            ca_file=ca_file,
        ) from None
    return smtp, name
