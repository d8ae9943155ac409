"""The relay against the aiosmtpd sink: MAIL options, EHLO name, refusals of the forwarder
itself, and `forwarder check`'s probe.

Messages go through the real Dovecot (LMTP in, IMAP out) and reach the sink
(tests/servers), which records the MAIL options and can refuse what a test asks.
"""

from __future__ import annotations

import io
import time
from collections import Counter

import pytest
from structlog.testing import capture_logs

from forwarder import smtp_session
from forwarder.config import Settings
from forwarder.errors import EXIT_OK, EXIT_RUNTIME, ConfigError, SubmissionRefused
from forwarder.factory import open_store
from forwarder.service import check
from forwarder.smtp_relay import SmtpRelay
from forwarder.state import DeliveryQuery, Status
from tests.conftest import ADMIN, MakeSettings, forward_once
from tests.faults import FaultProxy
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink

CONTACT = "contact@example.org"
MEMBERS = ("alice@example.org", "bob@example.org")
NOT_OWNED = f"553 5.7.1 <{ADMIN}>: Sender address rejected: not owned by user relay@example.org"
T0 = time.time()
LATER = T0 + 3600.0


def deliver(mailbox: MailServer, body: bytes = b"Hello\r\n", subject: str = "Hello") -> None:
    mailbox.deliver(build_message(to=CONTACT, subject=subject, body=body), [CONTACT])


def delivered(sink: SmtpSink) -> Counter[str]:
    return Counter(rcpt for r in sink.received for rcpt in r.rcpt_tos)


def statuses(settings: Settings) -> dict[str, Status]:
    store = open_store(settings, readonly=True)
    try:
        rows = store.deliveries(None, DeliveryQuery())
    finally:
        store.close()
    return {row.member: row.status for row in rows}


# --------------------------------------------------------------------------- MAIL FROM options


async def test_8bit_message_is_sent_with_body_8bitmime_and_without_smtputf8(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    deliver(mailbox, "Réunion à 14h: café ☕\r\n".encode(), subject="Réunion")
    await forward_once(settings)
    [received] = smtp_sink.received
    assert "BODY=8BITMIME" in received.mail_options
    assert "SMTPUTF8" not in received.mail_options  # the sink offers it: not needed


async def test_ascii_message_is_sent_without_body_or_smtputf8(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    deliver(mailbox)
    await forward_once(settings)
    [received] = smtp_sink.received
    assert received.mail_options == [f"SIZE={len(received.data)}"]


async def test_non_ascii_recipient_is_sent_with_smtputf8(
    smtp_sink: SmtpSink, settings: Settings
) -> None:
    relay = SmtpRelay(settings.mailboxes()[0].smtp, settings.tls_ca_file)
    try:
        replies = await relay.send(ADMIN, ["zoé@example.org"], b"", b"Subject: x\r\n\r\nx\r\n")
    finally:
        await relay.close()
    assert replies["zoé@example.org"].accepted
    [received] = smtp_sink.received
    assert "SMTPUTF8" in received.mail_options
    assert received.rcpt_tos == ["zoé@example.org"]


async def test_8bit_message_to_a_server_without_8bitmime_fails_its_members_visibly(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.hidden_extensions = {"8BITMIME", "SMTPUTF8"}
    deliver(mailbox, "Grüße\r\n".encode(), subject="Grüße")
    deliver(mailbox, subject="plain ASCII")
    with capture_logs() as logs:
        await forward_once(settings)
    failures = [e for e in logs if e["event"] == "delivery_failed"]
    assert sorted(e["member"] for e in failures) == list(MEMBERS)
    assert all(e["code"] == 554 and "8BITMIME" in e["reply"] for e in failures)
    assert all(e["log_level"] == "error" for e in failures)
    [received] = smtp_sink.received  # the ASCII message went on
    assert received.data.isascii()
    flags = [flags for _, flags, _ in mailbox.messages()]
    assert {b"$Forwarded", b"$ForwardFailed"} <= flags[0]
    assert b"$ForwardFailed" not in flags[1]


async def test_non_ascii_recipient_without_smtputf8_is_refused_with_a_clear_reply(
    smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.hidden_extensions = {"SMTPUTF8"}
    relay = SmtpRelay(settings.mailboxes()[0].smtp, settings.tls_ca_file)
    try:
        replies = await relay.send(
            ADMIN, ["zoé@example.org", "bob@example.org"], b"", b"Subject: x\r\n\r\nx\r\n"
        )
    finally:
        await relay.close()
    assert replies["zoé@example.org"].code == 553
    assert "SMTPUTF8" in replies["zoé@example.org"].text
    assert replies["bob@example.org"].accepted
    [received] = smtp_sink.received
    assert received.rcpt_tos == ["bob@example.org"]
    assert "SMTPUTF8" not in received.mail_options


# --------------------------------------------------------------------------- EHLO name


async def test_ehlo_name_is_an_address_literal_on_a_machine_without_a_fqdn(
    mailbox: MailServer,
    smtp_proxy: FaultProxy,
    make_settings: MakeSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(smtp_session, "machine_fqdn", lambda: "localhost")
    deliver(mailbox)
    proxy = FaultProxy(smtp_proxy.target_host, smtp_proxy.target_port, record=True)
    with proxy:
        await forward_once(make_settings(smtp_port=proxy.port))
        sent = proxy.recorded("client")
    assert sent.startswith(b"EHLO [127.0.0.1]\r\n")


async def test_ehlo_name_is_the_machines_fqdn_when_it_has_one(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    make_settings: MakeSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(smtp_session, "machine_fqdn", lambda: "forwarder.example.net")
    deliver(mailbox)
    with FaultProxy(smtp_sink.host, smtp_sink.port, record=True) as proxy:
        await forward_once(make_settings(smtp_port=proxy.port))
        sent = proxy.recorded("client")
    assert sent.startswith(b"EHLO forwarder.example.net\r\n")


async def test_ehlo_name_setting_overrides_the_machines_name(
    mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    deliver(mailbox)
    with FaultProxy(smtp_sink.host, smtp_sink.port, record=True) as proxy:
        await forward_once(make_settings(smtp_port=proxy.port, smtp_helo_name="mail.example.org"))
        sent = proxy.recorded("client")
    assert sent.startswith(b"EHLO mail.example.org\r\n")


def test_ehlo_name_setting_with_a_line_break_is_a_configuration_error(
    make_settings: MakeSettings,
) -> None:
    with pytest.raises(ConfigError, match="FORWARDER_SMTP_HELO_NAME"):
        make_settings(smtp_helo_name="mail.example.org\r\nRSET")


# --------------------------------------------------------------------------- refusals of us


async def test_sender_refused_at_rcpt_for_every_member_stops_the_cycle_and_fails_nobody(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.rcpt_responses.update(dict.fromkeys(MEMBERS, NOT_OWNED))
    deliver(mailbox)
    with pytest.raises(SubmissionRefused) as error, capture_logs() as logs:
        await forward_once(settings, now=T0)
    message = str(error.value)
    assert "FORWARDER_ENVELOPE_SENDER" in message and "Sender address rejected" in message
    assert "\n" not in message
    assert "DATA" not in smtp_sink.commands
    assert not [e for e in logs if e["event"] in ("delivery_failed", "message_failed")]
    assert Status.FAILED not in statuses(settings).values()
    [(_, flags, _)] = mailbox.messages()
    assert flags == set()

    smtp_sink.rcpt_responses.clear()  # the administrator fixed the login's sender map
    await forward_once(settings, now=T0 + 1)  # due at once: no back-off was charged
    await forward_once(settings, now=LATER)
    assert delivered(smtp_sink) == Counter(dict.fromkeys(MEMBERS, 1))


async def test_sender_refused_for_one_member_only_defers_that_member(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.rcpt_responses["bob@example.org"] = NOT_OWNED
    deliver(mailbox)
    await forward_once(settings, now=T0)
    assert delivered(smtp_sink) == Counter({"alice@example.org": 1})
    assert statuses(settings)["bob@example.org"] is Status.DEFERRED

    smtp_sink.rcpt_responses.clear()
    await forward_once(settings, now=LATER)
    assert delivered(smtp_sink) == Counter(dict.fromkeys(MEMBERS, 1))


async def test_authentication_required_at_mail_from_names_the_login_settings(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.mail_response = "530 5.7.0 Authentication required"
    deliver(mailbox)
    with pytest.raises(SubmissionRefused, match="FORWARDER_SMTP_USERNAME"):
        await forward_once(settings)
    assert Status.FAILED not in statuses(settings).values()


async def test_relay_refused_for_every_member_names_the_host_setting(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    for member in MEMBERS:
        smtp_sink.rcpt_responses[member] = f"554 5.7.1 <{member}>: Relay access denied"
    deliver(mailbox)
    with pytest.raises(SubmissionRefused, match="FORWARDER_SMTP_HOST"):
        await forward_once(settings)
    assert Status.FAILED not in statuses(settings).values()


async def test_a_members_own_refusal_still_fails_that_member(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    for member in MEMBERS:
        smtp_sink.rcpt_responses[member] = f"550 5.1.1 <{member}>: User unknown"
    deliver(mailbox)
    await forward_once(settings)
    assert set(statuses(settings).values()) == {Status.FAILED}


# --------------------------------------------------------------------------- check's probe


def probe_lists() -> dict[str, list[str]]:
    return {
        "contact@example.org": ["alice@example.org", "bob@example.org"],
        "partners@example.org": ["erin@partner.example", "frank@partner.example"],
    }


async def test_check_probes_the_sender_and_one_member_per_domain_without_data(
    smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    with FaultProxy(smtp_sink.host, smtp_sink.port, record=True) as proxy:
        settings = make_settings(smtp_port=proxy.port, lists=probe_lists(), member_domains="*")
        out = io.StringIO()
        assert await check(settings, out) == EXIT_OK
        sent = proxy.recorded("client")
    rcpts = [line for line in sent.split(b"\r\n") if line.startswith(b"RCPT TO:")]
    assert rcpts == [b"RCPT TO:<alice@example.org>", b"RCPT TO:<erin@partner.example>"]
    assert f"MAIL FROM:<{ADMIN}>".encode() in sent
    assert b"DATA" not in sent and b"RSET" in sent
    assert smtp_sink.received == []
    assert "RCPT TO alice@example.org: ok" in out.getvalue()


async def test_check_reports_a_refused_member_with_its_reply(
    smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    smtp_sink.rcpt_responses["erin@partner.example"] = "550 5.1.1 <erin@partner.example>: unknown"
    settings = make_settings(lists=probe_lists(), member_domains="*")
    out = io.StringIO()
    assert await check(settings, out) == EXIT_RUNTIME
    assert "RCPT TO erin@partner.example: refused (550 5.1.1" in out.getvalue()


async def test_check_reports_a_refused_sender_naming_the_setting(
    smtp_sink: SmtpSink,
    make_settings: MakeSettings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    smtp_sink.rcpt_responses.update(dict.fromkeys(MEMBERS, NOT_OWNED))
    settings = make_settings(lists={"contact@example.org": list(MEMBERS)})
    assert await check(settings, io.StringIO()) == EXIT_RUNTIME
    error = capsys.readouterr().err
    assert "FORWARDER_ENVELOPE_SENDER" in error and "not owned by user" in error
