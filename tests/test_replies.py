"""Whom an SMTP refusal is about (forwarder.replies), on replies real servers give. Pure."""

from __future__ import annotations

import pytest

from forwarder.replies import Concern, Reply, ReplyCode, concern, enhanced_status

SENDER, LOGIN, RELAY, MEMBER = Concern.SENDER, Concern.LOGIN, Concern.RELAY, Concern.MEMBER


@pytest.mark.parametrize(
    ("code", "text", "about"),
    [
        # Postfix submission (smtpd_sender_login_maps, restrictions), answered at RCPT
        (553, "5.7.1 <lists@example.org>: Sender address rejected: not owned by user relay@example.org", SENDER),  # noqa: E501
        (553, "5.7.1 <lists@example.org>: Sender address rejected: not logged in", SENDER),
        (450, "4.1.8 <lists@example.invalid>: Sender address rejected: Domain not found", SENDER),
        (550, "5.1.8 <lists@example.invalid>: Sender address rejected: Domain not found", SENDER),
        (504, "5.5.2 <lists>: Sender address rejected: need fully-qualified address", SENDER),
        (554, "5.7.1 <localhost[127.0.0.1]>: Client host rejected: Access denied", LOGIN),
        (530, "5.7.0 Must issue a STARTTLS command first", LOGIN),
        (554, "5.7.1 <bob@elsewhere.example>: Relay access denied", RELAY),
        # Exim
        (550, "relay not permitted", RELAY),
        (550, "Sender verify failed", SENDER),
        (451, "Could not complete sender verify", MEMBER),  # temporary, not a refusal of us
        # Sendmail
        (550, "5.7.1 <bob@elsewhere.example>... Relaying denied. Proper authentication required.", RELAY),  # noqa: E501
        (553, "5.1.7 <lists@>... Bad sender address syntax", SENDER),
        # Microsoft 365 / Exchange
        (530, "5.7.57 Client not authenticated to send mail", LOGIN),
        (550, "5.7.60 SMTP; Client does not have permissions to send as this sender", SENDER),
        (550, "5.7.54 SMTP; Unable to relay recipient in non-accepted domain", RELAY),
        (550, "5.7.64 TenantAttribution; Relay Access Denied", RELAY),
        # Google
        (530, "5.7.0 Authentication Required. Learn more at https://support.google.com/mail", LOGIN),  # noqa: E501
        (550, "5.7.0 Mail relay denied [192.0.2.1].", RELAY),
        # RFC 4954, RFC 5248, RFC 7505
        (535, "5.7.8 Authentication credentials invalid", LOGIN),
        (554, "5.7.13 User account disabled", LOGIN),
        (550, "5.7.27 Sender address has null MX", SENDER),
        (550, "5.7.1 Sender not allowed to send as lists@example.org", SENDER),
        # A member's own refusal
        (550, "5.1.1 <ghost@example.org>: Recipient address rejected: User unknown", MEMBER),
        (550, "5.1.1 <ghost@example.org> User doesn't exist: ghost@example.org", MEMBER),
        (552, "5.2.2 <bob@example.org> Mailbox is full / Blocks limit exceeded", MEMBER),
        (452, "4.2.2 Mailbox full", MEMBER),
        (554, "5.7.1 <bob@example.org>: Recipient address rejected: Access denied", MEMBER),
        (550, "5.7.1 Message rejected as spam by Content Filtering.", MEMBER),
        (450, "4.7.1 <bob@example.org>: Recipient address rejected: Greylisted", MEMBER),
        (552, "5.3.4 Message size exceeds fixed limit", MEMBER),
        (550, "5.6.7 SMTPUTF8 is required", MEMBER),
        (550, "mailbox unavailable", MEMBER),
    ],
)
def test_refusals_of_real_servers_are_classified(code: int, text: str, about: Concern) -> None:
    assert concern(code, text) is about


def test_a_reply_naming_the_recipient_is_the_members_even_with_sender_words() -> None:
    text = "5.7.1 <bob@example.org>: Recipient address rejected: sender not allowed here"
    assert concern(550, text) is MEMBER


def test_the_enhanced_code_decides_before_the_wording() -> None:
    assert concern(550, "5.1.8 something about the domain") is SENDER
    # X.1.1 to X.1.6 and X.2.x are about the destination mailbox, whatever the words say
    assert concern(550, "5.1.1 <bob@example.org>: relay access denied") is MEMBER
    assert concern(552, "5.2.2 sender address rejected: mailbox full") is MEMBER
    # X.1.0 and X.7.1 say nothing definite: the wording decides
    assert concern(550, "5.1.0 Sender address rejected") is SENDER
    assert concern(550, "5.7.1 relaying denied") is RELAY


@pytest.mark.parametrize("about", [SENDER, LOGIN, RELAY])
def test_only_member_refusals_are_not_ours(about: Concern) -> None:
    assert about.ours
    assert not MEMBER.ours


def test_reply_reports_whom_it_is_about() -> None:
    text = "5.7.1 <a@b.example>: Sender address rejected"
    reply = Reply(ReplyCode.MAILBOX_NAME_NOT_ALLOWED, text)
    assert reply.about is SENDER
    assert not reply.accepted and not reply.transient


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("5.7.1 <x>: Sender address rejected", (5, 7, 1)),
        ("4.2.2 Mailbox full", (4, 2, 2)),
        ("2.0.0 Ok: queued as 1234", (2, 0, 0)),
        ("5.7.60 SMTP; Client does not have permissions", (5, 7, 60)),
        ("Relay access denied", None),
        ("550 5.1.1 text", None),  # the reply code is not part of the text
        ("5.1 incomplete", None),
    ],
)
def test_enhanced_status_is_read_from_the_start_of_the_text(
    text: str, status: tuple[int, int, int] | None
) -> None:
    assert enhanced_status(text) == status


def test_reply_codes_are_the_rfc_values() -> None:
    assert ReplyCode.OK == 250 and ReplyCode.START_DATA == 354
    assert ReplyCode.AUTH_REQUIRED == 530 and ReplyCode.EXCEEDED_STORAGE == 552
