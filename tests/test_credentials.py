"""Non-ASCII user names and passwords, against the real servers.

IMAP LOGIN carries 7-bit strings only (RFC 3501): the forwarder uses
AUTHENTICATE PLAIN (UTF-8, RFC 4616) for such credentials, or says clearly
that the server does not allow it. SMTP AUTH PLAIN and LOGIN carry UTF-8.
"""

from __future__ import annotations

import pytest

from forwarder.errors import EXIT_AUTH, ImapAuthError
from tests.conftest import MakeSettings, forward_once
from tests.imap_faults import ImapFaultProxy
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink

UTF8_USER = "utf8@example.org"
PASSWORD = MailServer.other_logins[UTF8_USER]  # UTF-8 of 2, 3 and 4 bytes, `"` and `\\`
SMTP_USER = "relay@example.org"


@pytest.fixture
def utf8_login(mailbox: MailServer) -> tuple[str, str]:
    """A Dovecot login to the catch-all whose password is not ASCII."""
    return UTF8_USER, PASSWORD


async def test_a_non_ascii_imap_password_logs_in_with_authenticate_plain(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    make_settings: MakeSettings,
    utf8_login: tuple[str, str],
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])
    username, password = utf8_login
    summary = await forward_once(make_settings(imap_username=username, imap_password=password))
    assert summary.forwarded == 1
    assert len(smtp_sink.received) == 1


@pytest.mark.parametrize(
    ("username", "named", "not_named"),
    [
        (UTF8_USER, "FORWARDER_IMAP_PASSWORD", "FORWARDER_IMAP_USERNAME"),
        ("élodie@example.org", "FORWARDER_IMAP_USERNAME", "FORWARDER_IMAP_PASSWORD"),
    ],
    ids=["password", "user-name"],
)
async def test_non_ascii_credentials_without_auth_plain_are_a_clear_error_naming_the_variable(
    mailbox: MailServer,
    make_settings: MakeSettings,
    imap_faults: ImapFaultProxy,
    username: str,
    named: str,
    not_named: str,
) -> None:
    imap_faults.hide_capabilities = {b"AUTH=PLAIN"}  # a server offering LOGIN only
    password = PASSWORD if username == UTF8_USER else mailbox.password
    settings = make_settings(
        imap_port=imap_faults.port, imap_username=username, imap_password=password
    )
    with pytest.raises(ImapAuthError) as refused:
        await forward_once(settings)
    text = str(refused.value)
    assert named in text and "non-ASCII" in text and "AUTH=PLAIN" in text
    assert not_named not in text
    assert f"{imap_faults.host}:{imap_faults.port}" in text
    assert refused.value.exit_status == EXIT_AUTH


async def test_a_wrong_non_ascii_imap_password_is_a_refused_login(
    mailbox: MailServer, make_settings: MakeSettings, utf8_login: tuple[str, str]
) -> None:
    username, _ = utf8_login
    with pytest.raises(ImapAuthError) as refused:
        await forward_once(make_settings(imap_username=username, imap_password="wrông"))
    assert "refused the login" in str(refused.value)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_a_non_ascii_smtp_password_logs_in(
    mailbox: MailServer, make_settings: MakeSettings, mechanism: str
) -> None:
    others = tuple({"PLAIN", "LOGIN"} - {mechanism})
    mailbox.deliver(build_message(), ["contact@example.org"])
    with SmtpSink(auth=(SMTP_USER, PASSWORD), auth_exclude=others) as sink:
        settings = make_settings(
            smtp_port=sink.port, smtp_username=SMTP_USER, smtp_password=PASSWORD
        )
        summary = await forward_once(settings)
        assert summary.forwarded == 1
        assert [r.auth_login for r in sink.received] == [SMTP_USER]
