"""A send whose outcome is unknown: the whole message reached the SMTP server (the final
dot), then the connection broke or no reply came. It counts as an attempt, deferred with
the back-off and deadline of a 4xx, instead of going out again at every cycle.

Real Dovecot and the real aiosmtpd sink: `disconnect_after_data` makes the sink take the
whole DATA and drop the connection without replying; a DATA delay longer than
FORWARDER_SMTP_TIMEOUT makes it never answer in time. A cut before the final dot
(tests/faults.py) is the other case: nothing was delivered, the claims are given back.
"""

from __future__ import annotations

import io
from collections import Counter

import pytest
from structlog.testing import capture_logs

from forwarder.config import Settings
from forwarder.errors import SmtpError, StateError
from forwarder.replies import Reply
from forwarder.retry import backoff
from forwarder.smtp_relay import SmtpRelay
from forwarder.status import show_status
from tests.conftest import ADMIN, LISTS, MakeSettings, forward_once, make_forwarder
from tests.faults import FaultProxy
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink
from tests.test_durability import FlakyStore

CONTACT = "contact@example.org"
MEMBERS = LISTS[CONTACT]
FORWARDED = b"$Forwarded"
FORWARD_FAILED = b"$ForwardFailed"
T0 = 1_800_000_000.0
POLL = 10.0  # seconds between the simulated cycles
MESSAGE = b"Subject: x\r\nMessage-ID: <x@remote.example>\r\n\r\nbody\r\n"


def copies_reaching_the_server(sink: SmtpSink) -> Counter[str]:
    """Copies per member that reached the server in full: replied to or not."""
    return Counter(
        rcpt for r in [*sink.received, *sink.received_then_dropped] for rcpt in r.rcpt_tos
    )


def flags(mailbox: MailServer) -> list[set[bytes]]:
    return [f for _, f, _ in mailbox.messages()]


def due_retries(horizon: float) -> int:
    """How many retries of a member whose every attempt gets no reply fall due within
    `horizon` seconds of the first, at cycles every POLL seconds (retry.backoff)."""
    attempts, at = 1, 0.0
    while True:
        due = at + backoff(attempts)
        cycle = -(-due // POLL) * POLL  # the first cycle at or after the due time
        if cycle > horizon:
            return attempts - 1
        attempts, at = attempts + 1, cycle


async def test_relay_answers_no_reply_for_accepted_recipients_when_cut_after_the_final_dot(
    smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.rcpt_responses["carol@example.org"] = "550 5.1.1 no such user"
    smtp_sink.disconnect_after_data = 1
    relay = SmtpRelay(settings.mailboxes()[0].smtp, settings.tls_ca_file)
    try:
        replies = await relay.send(ADMIN, [*MEMBERS, "carol@example.org"], b"", MESSAGE)
        assert not relay.connected  # dropped: the next transaction opens a new one
        again = await relay.send(ADMIN, ["alice@example.org"], b"", MESSAGE)
    finally:
        await relay.close()
    unknown = Reply(None, "outcome unknown: the connection was lost (Unexpected EOF received) "
                    "after the message was sent")
    assert replies == {
        "alice@example.org": unknown,
        "bob@example.org": unknown,
        "carol@example.org": Reply(550, "5.1.1 no such user"),
    }
    assert unknown.transient and not unknown.accepted and not unknown.about.ours
    assert again["alice@example.org"].accepted


async def test_relay_raises_when_the_connection_is_lost_before_the_final_dot(
    smtp_sink: SmtpSink, smtp_proxy: FaultProxy, make_settings: MakeSettings
) -> None:
    settings = make_settings(smtp_port=smtp_proxy.port)
    fault = smtp_proxy.drop_after(0, side="client", after=b"DATA\r\n")  # no 354, no message
    relay = SmtpRelay(settings.mailboxes()[0].smtp, settings.tls_ca_file)
    try:
        with pytest.raises(SmtpError, match="connection was lost"):
            await relay.send(ADMIN, list(MEMBERS), b"", MESSAGE)
    finally:
        await relay.close()
    assert fault.triggered.is_set()
    assert "DATA" not in smtp_sink.commands


async def test_connection_lost_after_the_final_dot_defers_the_members_with_no_reply_code(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.disconnect_after_data = 1
    mailbox.deliver(build_message(), [CONTACT])
    with capture_logs() as logs:
        summary = await forward_once(settings, now=T0)  # no error: the cycle went on
    assert len(smtp_sink.received_then_dropped) == 1  # the server had the whole message
    deferred = [e for e in logs if e["event"] == "delivery_deferred"]
    assert sorted(e["member"] for e in deferred) == MEMBERS
    for event in deferred:
        assert event["code"] is None and event["reason"] == "no-reply"
        assert event["reply"].startswith("outcome unknown: the connection was lost")
        assert event["next_try"] is not None
    assert summary.deferred == 2 and summary.forwarded == 0
    assert flags(mailbox) == [set()]  # not flagged while the outcome is unknown
    [message] = [e for e in logs if e["event"] == "message_deferred"]
    assert message["duplicate"] is False  # it was sent in this cycle, only not answered


async def test_status_shows_an_ambiguous_send_as_deferred_with_its_outcome_unknown(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.disconnect_after_data = 1
    mailbox.deliver(build_message(), [CONTACT])
    await forward_once(settings, now=T0)
    out = io.StringIO()
    assert await show_status(settings, out=out) == 0
    text = out.getvalue()
    assert "deferred deliveries: 2" in text
    for member in MEMBERS:
        [line] = [line for line in text.splitlines() if line.strip().startswith(member)]
        assert "attempts 1" in line
        assert "last reply: outcome unknown: the connection was lost" in line


async def test_no_reply_within_the_smtp_timeout_after_the_final_dot_is_deferred_not_raised(
    mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    settings = make_settings(smtp_timeout=0.5)
    smtp_sink.delay["DATA"] = 30.0  # the whole message is in, the reply never comes in time
    mailbox.deliver(build_message(), [CONTACT])
    with capture_logs() as logs:
        await forward_once(settings, now=T0)
    assert smtp_sink.commands.count("DATA") == 1
    deferred = [e for e in logs if e["event"] == "delivery_deferred"]
    assert sorted(e["member"] for e in deferred) == MEMBERS
    assert all(e["reply"] == "outcome unknown: no reply within 0.5 s after the message was sent"
               for e in deferred), deferred

    await forward_once(settings, now=T0 + POLL)  # the next cycle: not due yet
    assert smtp_sink.commands.count("DATA") == 1


async def test_a_server_that_never_replies_after_data_gets_one_copy_per_due_retry_not_per_cycle(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.disconnect_after_data = 10_000  # every transaction: the whole DATA, no reply
    mailbox.deliver(build_message(), [CONTACT])
    horizon = 600.0
    cycles = 0
    now = T0
    while now - T0 <= horizon:
        await forward_once(settings, now=now)
        cycles += 1
        now += POLL
    expected = 1 + due_retries(horizon)  # 1 + retries at 60 s, 180 s and 420 s
    print(f"\nambiguous sends: {cycles} cycles in {horizon:g} s, {expected} copies per member")
    assert expected == 4
    assert copies_reaching_the_server(smtp_sink) == Counter(dict.fromkeys(MEMBERS, expected))
    assert flags(mailbox) == [set()]


async def test_ambiguous_sends_past_the_retry_deadline_fail_the_member_and_flag_the_message(
    mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    retry_for = 300.0
    settings = make_settings(retry_for=retry_for)
    smtp_sink.disconnect_after_data = 10_000
    mailbox.deliver(build_message(), [CONTACT])
    with capture_logs() as logs:
        for minute in range(16):  # a cycle a minute, for 15 minutes
            await forward_once(settings, now=T0 + 60.0 * minute)
    failed = [e for e in logs if e["event"] == "delivery_failed"]
    assert sorted(e["member"] for e in failed) == MEMBERS
    for event in failed:
        assert event["code"] is None
        assert event["reply"].startswith("gave up after 4 attempts: outcome unknown:"), event
    # attempts at 0, 60, 180 s, then the one due at 420 s (past the 300 s deadline) fails
    assert copies_reaching_the_server(smtp_sink) == Counter(dict.fromkeys(MEMBERS, 4))
    assert flags(mailbox) == [{FORWARDED, FORWARD_FAILED, b"\\Seen"}]


async def test_the_cycle_goes_on_with_the_other_messages_after_an_ambiguous_send(
    mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    settings = make_settings(smtp_connections=1)  # one connection, dropped, then reopened
    for subject in ("first", "second", "third"):
        mailbox.deliver(build_message(subject=subject), [CONTACT])
    smtp_sink.disconnect_after_data = 1
    summary = await forward_once(settings, now=T0)
    assert len(smtp_sink.received_then_dropped) == 1
    assert len(smtp_sink.received) == 2  # the two others, in the same cycle
    assert (summary.delivered, summary.deferred, summary.forwarded) == (4, 2, 2)
    assert sorted(FORWARDED in f for f in flags(mailbox)) == [False, True, True]


async def test_a_send_cut_off_by_a_crash_is_given_up_at_the_retry_deadline_without_sending(
    mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    """A `pending` delivery whose claim expired (the process died between its send and the
    commit of the reply) counts an attempt when it is claimed again; found past
    FORWARDER_RETRY_FOR, it fails without being sent once more."""
    retry_for = 3600.0
    settings = make_settings(retry_for=retry_for)
    mailbox.deliver(build_message(), [CONTACT])
    store = FlakyStore(settings.state_db)
    store.full = True  # no reply is committed: a process killed right after its sends
    forwarder = make_forwarder(settings, store, now=T0)
    with pytest.raises(StateError):
        await forwarder.run_cycle()  # sent; the replies die with the process
    await forwarder.close()
    store.close()
    assert len(smtp_sink.received) == 1
    smtp_sink.clear()

    with capture_logs() as logs:
        await forward_once(settings, now=T0 + retry_for)
    failed = [e for e in logs if e["event"] == "delivery_failed"]
    assert sorted(e["member"] for e in failed) == MEMBERS
    assert all(e["reply"].startswith("gave up after 2 attempts: outcome unknown") for e in failed)
    assert smtp_sink.received == []  # not sent once more
    assert flags(mailbox) == [{FORWARDED, FORWARD_FAILED, b"\\Seen"}]


async def test_a_deferred_member_due_past_the_deadline_gets_one_last_attempt(
    mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    """A 4xx past FORWARDER_RETRY_FOR fails the member; a retry that falls due after the
    deadline is still made, and delivers if the server takes it now."""
    settings = make_settings(retry_for=30.0)
    smtp_sink.rcpt_responses["bob@example.org"] = "451 4.2.0 mailbox busy"
    mailbox.deliver(build_message(), [CONTACT])
    await forward_once(settings, now=T0)  # bob deferred, next try at T0 + 60 > deadline
    smtp_sink.rcpt_responses.clear()
    await forward_once(settings, now=T0 + 60)
    assert Counter(r for m in smtp_sink.received for r in m.rcpt_tos) == Counter(MEMBERS)
    assert flags(mailbox) == [{FORWARDED, b"\\Seen"}]
