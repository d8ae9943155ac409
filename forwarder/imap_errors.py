"""What an IMAP server's refusal or a failed connection means, as an error a person can act on.

Pure: no I/O. `ImapSource` hands over the server's words and the exception; this
module decides the class (refused credentials, temporary refusal, network) and
writes the fields of the error (`server`, `detail`, `settings`, `advice`).

Login refusals are classified by their response code (RFC 5530), then by wording:

| the server answers                                   | error           | exit / daemon |
|------------------------------------------------------|-----------------|---------------|
| NO [AUTHENTICATIONFAILED], [AUTHORIZATIONFAILED],    | ImapAuthError   | 3, stops      |
| [EXPIRED], [PRIVACYREQUIRED], [CONTACTADMIN]         |                 |               |
| NO [LIMIT], [UNAVAILABLE], [INUSE], [SERVERBUG]      | ImapBusyError   | 1, back-off   |
| BYE at the greeting or instead of the LOGIN reply    | ImapBusyError   | 1, back-off   |
| NO without a code, worded "too many connections",    | ImapBusyError   | 1, back-off   |
| "try again later", "temporarily", "unavailable"...   |                 |               |
| NO without a code, any other wording                 | ImapAuthError   | 3, stops      |
| the connection closed without a BYE                  | ImapError       | 1, back-off   |

A plain NO is taken for refused credentials: that is what servers older than RFC
5530 answer to a wrong password, and retrying a wrong password forever can get
the account locked; only words that say "later" make it temporary.
"""

from __future__ import annotations

import re
from typing import Final

from forwarder.errors import ImapAuthError, ImapBusyError, ImapError

CREDENTIALS: Final = ("FORWARDER_IMAP_USERNAME", "FORWARDER_IMAP_PASSWORD")
_CODE = re.compile(r"^\s*(?:\*\s+(?:NO|BYE)\s+)?\[([A-Za-z0-9.-]+)")
_TEMPORARY_WORDING = re.compile(
    r"too many|maximum number of|connection limit|simultaneous|concurrent|try again later"
    r"|temporar|unavailable|overload|busy|maintenance|throttl|rate limit",
    re.IGNORECASE,
)
_CREDENTIAL_ADVICE: Final = {
    "AUTHENTICATIONFAILED": None,
    "AUTHORIZATIONFAILED": "the account may not open this mailbox",
    "EXPIRED": "the password or account has expired: renew it",
    "PRIVACYREQUIRED": "the server wants TLS first: set FORWARDER_IMAP_SECURITY to tls or starttls",
    "CONTACTADMIN": "the server asks you to contact its administrator",
}
TEMPORARY_CODES: Final = frozenset({"LIMIT", "UNAVAILABLE", "INUSE", "SERVERBUG"})


def response_code(text: str) -> str | None:
    """The RFC 5530 response code at the start of a NO/BYE text (`[LIMIT] ...` -> `LIMIT`)."""
    found = _CODE.match(text)
    return found.group(1).upper() if found else None


def is_temporary_refusal(text: str, *, bye: bool) -> bool:
    """True when waiting may fix the refusal: see the table in the module docstring."""
    code = response_code(text)
    if code in _CREDENTIAL_ADVICE:
        return False
    if code in TEMPORARY_CODES or bye:
        return True
    return _TEMPORARY_WORDING.search(text) is not None


def login_refused(server: str, username: str, text: str, *, bye: bool) -> ImapError:
    """The error for a LOGIN that got NO (or a BYE) with this text."""
    text = text.strip() or ("BYE" if bye else "NO")
    if is_temporary_refusal(text, bye=bye):
        return ImapBusyError(
            f"refused the session for now ({text})",
            server=server,
            advice="probably too many connections for this account: close other IMAP "
            "clients or raise the server's limit; retrying with back-off",
        )
    return ImapAuthError(
        f"refused the login of {username} ({text})",
        server=server,
        advice=_CREDENTIAL_ADVICE.get(response_code(text) or ""),
        settings=CREDENTIALS,
    )


def no_utf8_login(server: str, non_ascii: list[bool]) -> ImapError:
    """Non-ASCII credentials (`non_ascii`: user name, password) and no AUTH=PLAIN."""
    variables = [name for name, flagged in zip(CREDENTIALS, non_ascii, strict=True) if flagged]
    return ImapAuthError(
        f"{' and '.join(variables)} has non-ASCII characters: IMAP LOGIN carries ASCII "
        "only, and the server does not offer AUTHENTICATE PLAIN (AUTH=PLAIN)",
        server=server,
        settings=variables,
        advice="enable the SASL PLAIN mechanism on the server or use ASCII credentials",
    )


def greeting_refused(server: str, greeting: str) -> ImapError:
    """The server greeted with BYE (RFC 3501 7.1.5: it refuses the connection) or NO."""
    if greeting.upper().startswith(("* BYE", "BYE")):
        return ImapBusyError(
            f"refused the connection at the greeting ({greeting})",
            server=server,
            advice="probably too many connections from this host or account; "
            "retrying with back-off",
        )
    return ImapError(f"unexpected greeting ({greeting})", server=server)


def no_greeting(server: str, seconds: float, *, speaks_tls: bool | None) -> ImapError:
    """No IMAP greeting in time. `speaks_tls`: what a TLS probe then found (True: a plain
    client on a port that wants a TLS handshake first; None: not even a TCP connection)."""
    if speaks_tls:
        return ImapError(
            f"no IMAP greeting within {seconds:g} s: this port expects TLS from the first "
            "byte (implicit TLS)",
            server=server,
            advice="set FORWARDER_IMAP_SECURITY=tls, or use the server's STARTTLS port (143)",
            settings=("FORWARDER_IMAP_SECURITY", "FORWARDER_IMAP_PORT"),
        )
    if speaks_tls is None:
        return ImapError(
            f"timed out after {seconds:g} s; the server is unreachable (a firewall?)",
            server=server,
            settings=("FORWARDER_IMAP_HOST", "FORWARDER_IMAP_PORT"),
        )
    return ImapError(
        f"connected, but no IMAP greeting within {seconds:g} s",
        server=server,
        advice="the server is overloaded, or this port is not an IMAP service",
        settings=("FORWARDER_IMAP_HOST", "FORWARDER_IMAP_PORT"),
    )


def plain_port_for_tls(server: str) -> ImapError:
    """A TLS handshake answered in plain text (OpenSSL's WRONG_VERSION_NUMBER)."""
    return ImapError(
        "the port answered in plain text, not TLS: it speaks plain IMAP",
        server=server,
        advice="set FORWARDER_IMAP_SECURITY=starttls for this port, or use the server's "
        "implicit-TLS port (993)",
        settings=("FORWARDER_IMAP_SECURITY", "FORWARDER_IMAP_PORT"),
    )
