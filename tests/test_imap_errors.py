"""Login refusals classified from what real servers answer (RFC 5530 codes, then words)."""

from __future__ import annotations

import pytest

from forwarder.errors import EXIT_AUTH, EXIT_RUNTIME, ImapAuthError, ImapBusyError
from forwarder.imap_errors import login_refused, response_code

SERVER = "IMAP server imap.example.org:993"

TEMPORARY = [
    # Dovecot, mail_max_userip_connections reached (seen here).
    (
        "[LIMIT] Maximum number of connections from user+IP exceeded "
        "(mail_max_userip_connections=1)",
        False,
    ),
    # Dovecot, the passdb unreachable.
    ("[UNAVAILABLE] Temporary authentication failure. [vm:2026-11-26 10:00:00]", False),
    ("[INUSE] Mailbox is locked, try again later", False),
    ("[SERVERBUG] Internal error occurred", False),
    # Gmail, too many sessions: no code, only words.
    ("[ALERT] Too many simultaneous connections. (Failure)", False),
    ("Maximum number of connections exceeded", False),
    # Courier: BYE instead of a reply.
    ("[ALERT] Too many connections from your IP address.", True),
    ("Server shutting down", True),
]
CREDENTIALS = [
    ("[AUTHENTICATIONFAILED] Authentication failed.", False),  # Dovecot (seen here)
    ("[AUTHENTICATIONFAILED] Invalid credentials (Failure)", False),  # Gmail
    ("[AUTHORIZATIONFAILED] Not authorized to use this mailbox", False),
    ("[EXPIRED] Password expired", False),
    ("[CONTACTADMIN] Account disabled", False),
    ("LOGIN failed.", False),  # Exchange Online: no code
    ("Login failed: authentication failure", False),  # Cyrus
    ("Authentication failed, please try again", False),  # "try again" alone is not "later"
    ("[ALERT] Please log in via your web browser (Failure)", False),  # Gmail
    ("[AUTHENTICATIONFAILED] Too many failed attempts", True),  # a code wins over words
    ("", False),
]


@pytest.mark.parametrize(("text", "bye"), TEMPORARY)
def test_temporary_refusals_are_busy_errors_retried_with_back_off(text: str, bye: bool) -> None:
    error = login_refused(SERVER, "catchall@example.org", text, bye=bye)
    assert type(error) is ImapBusyError and error.exit_status == EXIT_RUNTIME
    assert not any("PASSWORD" in s for s in error.settings)


@pytest.mark.parametrize(("text", "bye"), CREDENTIALS)
def test_refused_credentials_are_auth_errors_that_stop_the_service(text: str, bye: bool) -> None:
    error = login_refused(SERVER, "catchall@example.org", text, bye=bye)
    assert type(error) is ImapAuthError and error.exit_status == EXIT_AUTH
    assert "FORWARDER_IMAP_PASSWORD" in str(error)


def test_privacy_required_says_to_turn_tls_on() -> None:
    error = login_refused(SERVER, "u", "[PRIVACYREQUIRED] TLS required", bye=False)
    assert isinstance(error, ImapAuthError) and "FORWARDER_IMAP_SECURITY" in str(error)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("[LIMIT] x", "LIMIT"),
        ("  [inuse] x", "INUSE"),
        ("* BYE [UNAVAILABLE] x", "UNAVAILABLE"),
        ("no code [LIMIT]", None),
        ("", None),
    ],
)
def test_response_code_is_read_at_the_start_of_the_text(text: str, code: str | None) -> None:
    assert response_code(text) == code
