"""The poll cycle end to end: real Dovecot (LMTP in, IMAP out) and a real SMTP server."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections import Counter
from pathlib import Path

import dkim
import pytest
from structlog.testing import capture_logs

from forwarder.config import Settings
from forwarder.sqlite_store import SqliteStateStore
from tests.conftest import ADMIN, MakeSettings, forward_once, make_forwarder
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink

FORWARDED = b"$Forwarded"
SEEN = b"\\Seen"
ADDED_LINE = re.compile(rb"^(Received|X-Loop): [^\r\n]*\r\n")


def delivered(sink: SmtpSink) -> Counter[str]:
    """How many copies each member received."""
    return Counter(rcpt for r in sink.received for rcpt in r.rcpt_tos)


def added_header_lines(sent: bytes, original: bytes) -> list[bytes]:
    """The lines the forwarder put on top; asserts the rest is the original, byte for byte."""
    assert sent.endswith(original)
    prefix = sent[: len(sent) - len(original)]
    lines = re.findall(rb"[^\r\n]*\r\n", prefix)
    assert b"".join(lines) == prefix
    for line in lines:
        assert ADDED_LINE.match(line), line
    return lines


async def test_message_to_a_list_reaches_every_member(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(build_message(to="contact@example.org"), ["contact@example.org"])
    await forward_once(settings)
    assert len(smtp_sink.received) == 1
    assert smtp_sink.received[0].mail_from == ADMIN
    assert sorted(smtp_sink.received[0].rcpt_tos) == ["alice@example.org", "bob@example.org"]


async def test_forwarded_bytes_are_the_fetched_bytes_with_only_lines_on_top(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(
        build_message(body=b"Line one\r\n.starts with a dot\r\n\r\nend\r\n"),
        ["contact@example.org"],
    )
    [(_, _, original)] = mailbox.messages()
    await forward_once(settings)
    lines = added_header_lines(smtp_sink.received[0].data, original)
    assert b"X-Loop: contact@example.org\r\n" in lines


async def test_source_message_gets_forwarded_and_seen_after_delivery(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])
    await forward_once(settings)
    [(_, flags, _)] = mailbox.messages()
    assert {FORWARDED, SEEN} <= flags


async def test_second_poll_sends_nothing(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])
    await forward_once(settings)
    summary = await forward_once(settings)
    assert len(smtp_sink.received) == 1
    assert summary.messages == 0


async def test_message_whose_keywords_were_removed_is_not_sent_again(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])
    await forward_once(settings)
    with mailbox.imap() as client:  # a person, or a forwarder that died before marking
        client.select_folder("INBOX")
        client.remove_flags(client.search("ALL"), [FORWARDED, SEEN])
    await forward_once(settings)
    assert len(smtp_sink.received) == 1


async def test_bcc_list_is_found_through_the_received_for_clause(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(build_message(to="someone@elsewhere.example"), ["direction@example.org"])
    await forward_once(settings)
    assert delivered(smtp_sink) == {"dave@example.org": 1}


async def test_bcc_list_is_found_through_x_original_to(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    raw = build_message(
        to="someone@elsewhere.example", extra=["X-Original-To: direction@example.org"]
    )
    mailbox.deliver(raw, ["catchall@example.org", "other@example.org"])  # no `for` clause
    await forward_once(settings)
    # Two copies in the catch-all, one delivery.
    assert delivered(smtp_sink) == {"dave@example.org": 1}


async def test_two_copies_for_two_lists_reach_each_member_once(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    raw = build_message(to="contact@example.org, compta@example.org")
    mailbox.deliver(raw, ["contact@example.org", "compta@example.org"])
    assert len(mailbox.messages()) == 2
    await forward_once(settings)
    assert delivered(smtp_sink) == {
        "alice@example.org": 1,
        "bob@example.org": 1,
        "carol@example.org": 1,
    }
    assert all(FORWARDED in flags for _, flags, _ in mailbox.messages())


async def test_copies_with_their_own_envelope_headers_reach_each_member_once(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    body = build_message(to="undisclosed-recipients:;")
    mailbox.deliver(b"X-Original-To: contact@example.org\r\n" + body, ["contact@example.org"])
    mailbox.deliver(b"X-Original-To: compta@example.org\r\n" + body, ["compta@example.org"])
    await forward_once(settings)
    assert delivered(smtp_sink) == {
        "alice@example.org": 1,
        "bob@example.org": 1,
        "carol@example.org": 1,
    }


async def test_copies_without_message_id_are_deduplicated(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    raw = build_message(to="contact@example.org, compta@example.org", message_id=None)
    mailbox.deliver(raw, ["contact@example.org", "compta@example.org"])
    await forward_once(settings)
    assert delivered(smtp_sink) == {
        "alice@example.org": 1,
        "bob@example.org": 1,
        "carol@example.org": 1,
    }


async def test_plus_address_and_case_reach_the_list(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(build_message(to="Contact+Urgent@Example.ORG"), ["Contact+Urgent@Example.ORG"])
    await forward_once(settings)
    assert delivered(smtp_sink) == {"alice@example.org": 1, "bob@example.org": 1}


async def test_members_already_in_to_or_cc_and_the_sender_are_left_out(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    raw = build_message(
        to="compta@example.org", cc="Bob <BOB@example.org>", sender="carol@example.org"
    )
    mailbox.deliver(raw, ["compta@example.org"])
    await forward_once(settings)
    assert smtp_sink.received == []
    [(_, flags, _)] = mailbox.messages()
    assert FORWARDED in flags  # nothing left to deliver


async def test_message_with_our_loop_marker_is_not_forwarded(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(build_message(extra=["X-Loop: contact@example.org"]), ["contact@example.org"])
    await forward_once(settings)
    assert smtp_sink.received == []
    [(_, flags, _)] = mailbox.messages()
    assert FORWARDED not in flags


async def test_message_with_more_than_50_received_headers_is_not_forwarded(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    hops = [
        f"Received: from hop{i}.example by hop{i + 1}.example; Tue, 24 Nov 2026 10:00:00 +0000"
        for i in range(50)
    ]
    mailbox.deliver(build_message(extra=hops), ["contact@example.org"])  # LMTP adds the 51st
    await forward_once(settings)
    assert smtp_sink.received == []


async def test_unmatched_message_is_left_unread_and_logged_once(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(build_message(to="nobody@example.org"), ["nobody@example.org"])
    with capture_logs() as first:
        await forward_once(settings)
    with capture_logs() as second:
        summary = await forward_once(settings)
    assert [e["reason"] for e in first if e["event"] == "message_skipped"] == ["unmatched"]
    assert not [e for e in second if e["event"] == "message_skipped"]
    assert summary.messages == 0  # not downloaded again
    [(_, flags, _)] = mailbox.messages()
    assert flags == set()


async def test_a_new_list_applies_to_mail_that_arrives_after_it(
    mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    mailbox.deliver(build_message(to="new@example.org", subject="before"), ["new@example.org"])
    await forward_once(make_settings())
    lists = {"new@example.org": ["erin@example.org"]}
    mailbox.deliver(build_message(to="new@example.org", subject="after"), ["new@example.org"])
    await forward_once(make_settings(lists=lists))
    assert delivered(smtp_sink) == {"erin@example.org": 1}
    assert b"Subject: after" in smtp_sink.received[0].data


async def test_8bit_utf8_headers_and_body_pass_byte_exact(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    raw = build_message(
        subject="Réunion à 14h — café ☕", body="Bonjour, voilà le compte-rendu: ÉÀÇ ✓\r\n".encode()
    )
    raw = raw.replace(b"From: Customer", "From: Zoé Müller".encode())
    mailbox.deliver(raw, ["contact@example.org"])
    [(_, _, original)] = mailbox.messages()
    await forward_once(settings)
    added_header_lines(smtp_sink.received[0].data, original)
    assert "Zoé Müller".encode() in smtp_sink.received[0].data


def _rsa_key(tmp: Path) -> tuple[bytes, bytes]:
    key = tmp / "dkim.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
    public = subprocess.run(
        ["openssl", "rsa", "-in", str(key), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    import base64

    return key.read_bytes(), base64.b64encode(public)


async def test_dkim_signature_still_verifies_at_the_receiver(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings, tmp_path: Path
) -> None:
    private, public = _rsa_key(tmp_path)
    unsigned = build_message(subject="Signé", body="Corps signé, accentué.\r\n".encode())
    signature = dkim.sign(
        unsigned,
        b"sel",
        b"remote.example",
        private,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    mailbox.deliver(signature + unsigned, ["contact@example.org"])
    await forward_once(settings)

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"sel._domainkey.remote.example."
        return b"v=DKIM1; k=rsa; p=" + public

    assert dkim.verify(smtp_sink.received[0].data, dnsfunc=dns)


async def test_refused_member_fails_and_the_others_are_delivered(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.rcpt_responses["bob@example.org"] = "550 5.1.1 no such user"
    mailbox.deliver(build_message(), ["contact@example.org"])
    with capture_logs() as logs:
        await forward_once(settings)
    assert delivered(smtp_sink) == {"alice@example.org": 1}
    [(_, flags, _)] = mailbox.messages()
    assert {FORWARDED, b"$ForwardFailed"} <= flags
    [failure] = [e for e in logs if e["event"] == "delivery_failed"]
    assert (failure["member"], failure["code"]) == ("bob@example.org", 550)


async def test_deferred_member_is_retried_later_and_only_then_marked(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.rcpt_responses["bob@example.org"] = "451 4.3.0 try again later"
    mailbox.deliver(build_message(), ["contact@example.org"])
    await forward_once(settings, now=1_000_000.0)
    [(_, flags, _)] = mailbox.messages()
    assert FORWARDED not in flags
    smtp_sink.rcpt_responses.clear()
    await forward_once(settings, now=1_000_010.0)  # not due yet
    assert delivered(smtp_sink) == {"alice@example.org": 1}
    await forward_once(settings, now=1_000_100.0)
    assert delivered(smtp_sink) == {"alice@example.org": 1, "bob@example.org": 1}
    [(_, flags, _)] = mailbox.messages()
    assert FORWARDED in flags


async def test_uidvalidity_change_sends_nothing_again(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    raw = build_message()
    mailbox.deliver(raw, ["contact@example.org"])
    await forward_once(settings)
    before = mailbox.uidvalidity()
    mailbox.recreate_inbox()
    mailbox.deliver(raw, ["contact@example.org"])
    assert mailbox.uidvalidity() != before
    await forward_once(settings)
    assert len(smtp_sink.received) == 1


async def test_one_event_per_message_and_a_cycle_summary(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(build_message(body=b"secret body text\r\n"), ["contact@example.org"])
    with capture_logs() as logs:
        await forward_once(settings)
    [event] = [e for e in logs if e["event"] == "message_forwarded"]
    assert event["uid"] > 0 and event["message_id"].endswith("@remote.example")
    assert event["lists"] == ["contact@example.org"]
    assert event["recipients"] == 2 and "duration_ms" in event
    [summary] = [e for e in logs if e["event"] == "cycle_finished"]
    assert (summary["outcome"], summary["forwarded"], summary["delivered"]) == ("ok", 1, 2)
    assert "secret body text" not in repr(logs)
    assert settings.mailboxes()[0].imap.password.get_secret_value() not in repr(logs)


async def test_reading_does_not_set_seen_on_messages_left_in_place(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.rcpt_responses["dave@example.org"] = "451 4.3.0 later"
    mailbox.deliver(build_message(to="direction@example.org"), ["direction@example.org"])
    await forward_once(settings)
    [(_, flags, _)] = mailbox.messages()
    assert SEEN not in flags


@pytest.mark.parametrize("batch", [1, 2])
async def test_backlog_is_read_in_batches_and_fully_forwarded(
    mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings, batch: int
) -> None:
    for _ in range(5):
        mailbox.deliver(build_message(to="direction@example.org"), ["direction@example.org"])
    summary = await forward_once(make_settings(fetch_batch_messages=batch))
    assert summary.forwarded == 5
    assert delivered(smtp_sink) == {"dave@example.org": 5}


async def test_messages_left_unsent_by_a_stop_go_out_at_the_next_cycle(
    mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    """A stop finishes the transactions in flight and gives the other claims back: those
    members are due at once, not when the claims would have ended (the claim lease)."""
    settings = make_settings(smtp_connections=1)
    for subject in ("first", "second", "third"):
        mailbox.deliver(build_message(subject=subject), ["direction@example.org"])
    smtp_sink.delay["DATA"] = 0.3
    store = SqliteStateStore(settings.state_db)
    forwarder = make_forwarder(settings, store)
    try:
        cycle = asyncio.create_task(forwarder.run_cycle())
        await asyncio.to_thread(smtp_sink.wait_for, 1)  # the first is sent, two wait
        forwarder.stopping = True  # as SIGTERM does
        await cycle
    finally:
        await forwarder.close()
        store.close()
    assert len(smtp_sink.received) <= 2  # the one in flight when asked to stop
    smtp_sink.delay.clear()
    await forward_once(settings)  # a restart, moments later
    assert delivered(smtp_sink) == {"dave@example.org": 3}


async def test_empty_polls_are_recorded_at_most_every_ten_minutes(settings: Settings) -> None:
    """A thousand mailboxes polling every minute must not write a record each time."""
    store = SqliteStateStore(settings.state_db)
    forwarder = make_forwarder(settings, store)
    try:
        for _ in range(3):
            await forwarder.run_cycle()
        assert store.report(None, failed_limit=1).cycles == 1
    finally:
        await forwarder.close()
        store.close()
