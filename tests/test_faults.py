"""Reliability under faults: no message lost, no member served twice.

Real Dovecot and a real SMTP server (tests/servers/), with faults injected
by the SMTP sink itself or by a TCP proxy in front of either server
(tests/faults.py). The last section checks the fault injectors themselves.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from imapclient import IMAPClient
from structlog.testing import capture_logs

from forwarder.config import Settings
from forwarder.errors import ForwarderError
from forwarder.sqlite_store import SqliteStateStore
from tests.conftest import ADMIN, MakeSettings, forward_once, make_forwarder
from tests.faults import Fault, FaultProxy, _Progress
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink

FORWARDED = b"$Forwarded"
FORWARD_FAILED = b"$ForwardFailed"
CONTACT = "contact@example.org"
CONTACT_MEMBERS = ("alice@example.org", "bob@example.org")
ADDED_LINE = re.compile(rb"^(Received|X-Loop): [^\r\n]*\r\n")
MESSAGE_ID = re.compile(rb"^Message-ID: <([^>\r\n]+)>\r?$", re.MULTILINE | re.IGNORECASE)
BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")
# Large enough that a drop "mid-FETCH" or "mid-DATA" really is in the middle.
LONG_BODY = b"".join(
    b"line %05d of a long body, to be cut in the middle\r\n" % i for i in range(2000)
)
# Larger than every socket buffer on the way: a cut in its DATA comes before the final dot.
HUGE_BODY = LONG_BODY * 80
T0 = time.time()
LATER = T0 + 3600.0  # past the first retry (1 min), well within retry_for (5 days)


# --------------------------------------------------------------------------- helpers


def delivered(sink: SmtpSink) -> Counter[str]:
    """How many copies each member received."""
    return Counter(rcpt for r in sink.received for rcpt in r.rcpt_tos)


def ident(data: bytes) -> str:
    match = MESSAGE_ID.search(data)
    assert match is not None, data[:300]
    return match.group(1).decode()


def copies(sink: SmtpSink) -> Counter[tuple[str, str]]:
    """(Message-ID, member) -> how many copies the server accepted."""
    return Counter((ident(r.data), rcpt) for r in sink.received for rcpt in r.rcpt_tos)


def flags_by_id(mailbox: MailServer) -> dict[str, set[bytes]]:
    return {ident(raw): flags for _, flags, raw in mailbox.messages()}


def deliver(mailbox: MailServer, subject: str, body: bytes = LONG_BODY, **kwargs: Any) -> str:
    """Deliver one message to contact@ by LMTP; return its Message-ID."""
    raw = build_message(subject=subject, body=body, **kwargs)
    mailbox.deliver(raw, [CONTACT])
    return ident(raw)


def assert_marked_only_if_delivered(mailbox: MailServer, sink: SmtpSink) -> None:
    """No copy twice; a message with $Forwarded reached each member exactly once."""
    sent = copies(sink)
    assert all(n == 1 for n in sent.values()), sent
    for message_id, flags in flags_by_id(mailbox).items():
        if FORWARDED in flags:
            assert all(sent[(message_id, m)] == 1 for m in CONTACT_MEMBERS), (message_id, sent)


def assert_all_forwarded_once(mailbox: MailServer, sink: SmtpSink, ids: list[str]) -> None:
    assert copies(sink) == Counter({(i, m): 1 for i in ids for m in CONTACT_MEMBERS})
    flags = flags_by_id(mailbox)
    assert sorted(flags) == sorted(ids)
    assert all(FORWARDED in f and FORWARD_FAILED not in f for f in flags.values()), flags


def only_crlf(data: bytes) -> bool:
    return BARE_CR_OR_LF.search(data) is None


# --------------------------------------------------------------------------- SMTP replies


async def test_rcpt_4xx_for_one_member_delivers_the_others_and_retries_it_later(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.rcpt_responses["bob@example.org"] = "451 4.2.0 mailbox busy"
    [message_id] = [deliver(mailbox, "busy", body=b"short\r\n")]
    await forward_once(settings, now=T0)
    assert delivered(smtp_sink) == {"alice@example.org": 1}
    assert FORWARDED not in flags_by_id(mailbox)[message_id]

    smtp_sink.rcpt_responses.clear()
    await forward_once(settings, now=LATER)
    assert delivered(smtp_sink) == {"alice@example.org": 1, "bob@example.org": 1}
    assert FORWARDED in flags_by_id(mailbox)[message_id]


async def test_rcpt_5xx_for_one_member_delivers_the_others_marks_failed_and_never_resends(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.rcpt_responses["bob@example.org"] = "550 5.1.1 no such user"
    message_id = deliver(mailbox, "unknown user", body=b"short\r\n")
    await forward_once(settings, now=T0)
    assert delivered(smtp_sink) == {"alice@example.org": 1}
    assert {FORWARDED, FORWARD_FAILED} <= flags_by_id(mailbox)[message_id]

    smtp_sink.rcpt_responses.clear()
    with mailbox.imap() as client:  # even looked at again, the failure is final
        client.select_folder("INBOX")
        client.remove_flags(client.search("ALL"), [FORWARDED, FORWARD_FAILED])
        client.logout()
    await forward_once(settings, now=LATER)
    assert delivered(smtp_sink) == {"alice@example.org": 1}


async def test_5xx_after_data_fails_every_member_and_marks_forward_failed(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.data_response = "554 5.6.0 message content rejected"
    message_id = deliver(mailbox, "rejected", body=b"short\r\n")
    with capture_logs() as logs:
        await forward_once(settings)
    failed = sorted((e["member"], e["code"]) for e in logs if e["event"] == "delivery_failed")
    assert failed == [("alice@example.org", 554), ("bob@example.org", 554)]
    assert {FORWARDED, FORWARD_FAILED} <= flags_by_id(mailbox)[message_id]
    assert smtp_sink.received == []


async def test_4xx_after_data_defers_every_member_and_leaves_the_message_unmarked(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.data_response = "451 4.3.0 try again later"
    message_id = deliver(mailbox, "try later", body=b"short\r\n")
    with capture_logs() as logs:
        await forward_once(settings, now=T0)
    deferred = sorted(e["member"] for e in logs if e["event"] == "delivery_deferred")
    assert deferred == list(CONTACT_MEMBERS)
    assert FORWARDED not in flags_by_id(mailbox)[message_id]

    smtp_sink.data_response = None
    await forward_once(settings, now=LATER)
    assert_all_forwarded_once(mailbox, smtp_sink, [message_id])


async def test_mail_from_4xx_defers_every_member_and_leaves_the_message_unmarked(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.mail_response = "452 4.3.1 insufficient system storage"
    message_id = deliver(mailbox, "no storage", body=b"short\r\n")
    await forward_once(settings, now=T0)
    assert "DATA" not in smtp_sink.commands
    assert FORWARDED not in flags_by_id(mailbox)[message_id]

    smtp_sink.mail_response = None
    await forward_once(settings, now=LATER)
    assert_all_forwarded_once(mailbox, smtp_sink, [message_id])


async def test_mail_from_5xx_raises_naming_the_envelope_sender_setting_and_marks_nothing(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.mail_response = "553 5.7.1 sender address rejected"
    message_id = deliver(mailbox, "bad sender", body=b"short\r\n")
    with pytest.raises(ForwarderError, match="FORWARDER_ENVELOPE_SENDER"):
        await forward_once(settings)
    assert flags_by_id(mailbox)[message_id] == set()
    assert "DATA" not in smtp_sink.commands


# --------------------------------------------------------------------------- SMTP link faults


async def test_smtp_server_down_at_cycle_start_raises_naming_it_and_delivers_once_back(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    port = smtp_sink.port
    smtp_sink.stop()
    message_id = deliver(mailbox, "server down", body=b"short\r\n")
    with pytest.raises(ForwarderError) as error:
        await forward_once(settings)
    assert f"SMTP server {smtp_sink.host}:{port}" in str(error.value)
    assert flags_by_id(mailbox)[message_id] == set()

    smtp_sink.start()
    assert smtp_sink.port == port
    await forward_once(settings)
    assert_all_forwarded_once(mailbox, smtp_sink, [message_id])


async def test_smtp_connection_dropped_mid_data_raises_naming_smtp_and_loses_nothing(
    mailbox: MailServer, smtp_sink: SmtpSink, smtp_proxy: FaultProxy, make_settings: MakeSettings
) -> None:
    """Cut while the forwarder is still writing the DATA (before its final dot: the
    message is larger than the socket buffers), nothing can have been delivered: the
    cycle stops and the message goes out at the next one. (A cut once the final dot is
    written is an unknown outcome: tests/test_ambiguous_send.py.)"""
    settings = make_settings(smtp_port=smtp_proxy.port)
    ids = [
        deliver(mailbox, subject, body=body)
        for subject, body in (("first", LONG_BODY), ("second", HUGE_BODY), ("third", LONG_BODY))
    ]
    fault = smtp_proxy.drop_after(1000, side="client", after=b"Subject: second #")
    with pytest.raises(ForwarderError) as error:
        await forward_once(settings)
    assert fault.triggered.is_set()
    assert f"SMTP server {smtp_proxy.host}:{smtp_proxy.port}" in str(error.value)
    assert ids[1] not in {i for i, _ in copies(smtp_sink)}
    assert_marked_only_if_delivered(mailbox, smtp_sink)

    await forward_once(settings)
    assert_all_forwarded_once(mailbox, smtp_sink, ids)


async def test_smtp_connection_closed_by_the_server_between_cycles_is_reopened(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    store = SqliteStateStore(settings.state_db)
    forwarder = make_forwarder(settings, store)
    try:
        first = deliver(mailbox, "before", body=b"short\r\n")
        await forwarder.run_cycle()
        assert smtp_sink.open_connections >= 1
        smtp_sink.drop_connections()  # as a server closing idle connections does
        second = deliver(mailbox, "after", body=b"short\r\n")
        await forwarder.run_cycle()
    finally:
        await forwarder.close()
        store.close()
    assert_all_forwarded_once(mailbox, smtp_sink, [first, second])


async def test_message_larger_than_the_advertised_size_fails_every_member_and_is_not_retried(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.size_limit = 4000
    message_id = deliver(mailbox, "too large", body=(b"x" * 70 + b"\r\n") * 100)
    with capture_logs() as logs:
        await forward_once(settings, now=T0)
    assert "MAIL" not in smtp_sink.commands  # not even tried
    failures = {e["member"]: e["reply"] for e in logs if e["event"] == "delivery_failed"}
    assert sorted(failures) == list(CONTACT_MEMBERS)
    for reply in failures.values():
        assert "size" in reply.lower() and "4000" in reply, reply
    assert {FORWARDED, FORWARD_FAILED} <= flags_by_id(mailbox)[message_id]

    smtp_sink.size_limit = None
    await forward_once(settings, now=LATER)
    assert "MAIL" not in smtp_sink.commands


# --------------------------------------------------------------------------- IMAP faults


async def test_imap_connection_dropped_mid_fetch_of_the_only_batch_raises_and_sends_nothing(
    mailbox: MailServer, smtp_sink: SmtpSink, imap_proxy: FaultProxy, make_settings: MakeSettings
) -> None:
    settings = make_settings(imap_port=imap_proxy.port)  # the three messages in one FETCH
    ids = [deliver(mailbox, subject) for subject in ("first", "second", "third")]
    fault = imap_proxy.drop_after(1000, side="server", after=b"Subject: second #")
    with pytest.raises(ForwarderError) as error:
        await forward_once(settings)
    assert fault.triggered.is_set()
    assert f"IMAP server {imap_proxy.host}:{imap_proxy.port}" in str(error.value)
    assert smtp_sink.received == []
    assert all(flags == set() for flags in flags_by_id(mailbox).values())

    await forward_once(settings)
    assert_all_forwarded_once(mailbox, smtp_sink, ids)


async def test_imap_connection_dropped_mid_fetch_of_a_later_batch_raises_and_loses_nothing(
    mailbox: MailServer, smtp_sink: SmtpSink, imap_proxy: FaultProxy, make_settings: MakeSettings
) -> None:
    settings = make_settings(imap_port=imap_proxy.port, fetch_batch_messages=1)
    ids = [deliver(mailbox, subject) for subject in ("first", "second", "third")]
    fault = imap_proxy.drop_after(1000, side="server", after=b"Subject: second #")
    with pytest.raises(ForwarderError) as error:
        await forward_once(settings)
    assert fault.triggered.is_set()
    assert f"IMAP server {imap_proxy.host}:{imap_proxy.port}" in str(error.value)
    assert ids[1] not in {i for i, _ in copies(smtp_sink)}
    assert_marked_only_if_delivered(mailbox, smtp_sink)

    await forward_once(settings)
    assert_all_forwarded_once(mailbox, smtp_sink, ids)


async def test_imap_server_refusing_connections_raises_naming_it_then_delivers_once_back(
    mailbox: MailServer, smtp_sink: SmtpSink, imap_proxy: FaultProxy, make_settings: MakeSettings
) -> None:
    settings = make_settings(imap_port=imap_proxy.port)
    message_id = deliver(mailbox, "imap down", body=b"short\r\n")
    imap_proxy.refuse_connections()
    with pytest.raises(ForwarderError) as error:
        await forward_once(settings)
    assert f"IMAP server {imap_proxy.host}:{imap_proxy.port}" in str(error.value)
    assert smtp_sink.received == []

    imap_proxy.accept_connections()
    await forward_once(settings)
    assert_all_forwarded_once(mailbox, smtp_sink, [message_id])


async def test_imap_connection_dropped_between_cycles_of_one_forwarder_is_reopened(
    mailbox: MailServer, smtp_sink: SmtpSink, imap_proxy: FaultProxy, make_settings: MakeSettings
) -> None:
    settings = make_settings(imap_port=imap_proxy.port)
    store = SqliteStateStore(settings.state_db)
    forwarder = make_forwarder(settings, store)
    try:
        first = deliver(mailbox, "before", body=b"short\r\n")
        await forwarder.run_cycle()
        assert imap_proxy.drop_all() == 1
        second = deliver(mailbox, "after", body=b"short\r\n")
        await forwarder.run_cycle()
    finally:
        await forwarder.close()
        store.close()
    assert imap_proxy.accepted == 2
    assert_all_forwarded_once(mailbox, smtp_sink, [first, second])


async def test_uidvalidity_change_after_a_partial_delivery_sends_nobody_a_second_copy(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.rcpt_responses["bob@example.org"] = "451 4.2.0 mailbox busy"
    raw = build_message(subject="partial")
    mailbox.deliver(raw, [CONTACT])
    await forward_once(settings, now=T0)
    assert delivered(smtp_sink) == {"alice@example.org": 1}

    before = mailbox.uidvalidity()
    mailbox.recreate_inbox()  # same message, new UIDVALIDITY and UID
    mailbox.deliver(raw, [CONTACT])
    assert mailbox.uidvalidity() != before
    smtp_sink.rcpt_responses.clear()
    await forward_once(settings, now=LATER)
    assert_all_forwarded_once(mailbox, smtp_sink, [ident(raw)])


async def test_dovecot_restart_between_cycles_of_one_forwarder_loses_nothing(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    store = SqliteStateStore(settings.state_db)
    forwarder = make_forwarder(settings, store)
    try:
        first = deliver(mailbox, "before restart", body=b"short\r\n")
        await forwarder.run_cycle()
        await asyncio.to_thread(mailbox.restart)
        second = deliver(mailbox, "after restart", body=b"short\r\n")
        try:
            await forwarder.run_cycle()
        except ForwarderError:  # allowed once: the old session is found dead
            await forwarder.run_cycle()
    finally:
        await forwarder.close()
        store.close()
    assert_all_forwarded_once(mailbox, smtp_sink, [first, second])


# --------------------------------------------------------------------------- unusual input


async def test_bare_lf_line_endings_are_sent_as_crlf(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    raw = b"From: a@remote.example\nTo: contact@example.org\nSubject: lf\n\nline one\nline two\n"
    mailbox.deliver(raw, [CONTACT])  # smtplib appends CRLF, as the data does not end with one
    [(_, _, served)] = mailbox.messages()
    assert served.endswith(b"\r\n\r\nline one\r\nline two\r\n\r\n")  # Dovecot serves CRLF
    await forward_once(settings)
    [received] = smtp_sink.received
    assert only_crlf(received.data)
    assert received.data.endswith(served)


async def test_bare_cr_in_the_body_is_sent_with_crlf_line_endings_only(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    raw = b"From: a@remote.example\r\nTo: contact@example.org\r\nSubject: cr\r\n\r\none\rtwo\r\n"
    mailbox.deliver(raw, [CONTACT])
    [(_, _, served)] = mailbox.messages()
    assert served.endswith(b"\r\n\r\none\rtwo\r\n")  # Dovecot keeps a bare CR as it is
    await forward_once(settings)
    [received] = smtp_sink.received
    assert only_crlf(received.data)
    assert received.data.endswith(b"\r\n\r\none\r\ntwo\r\n")


async def test_8bit_message_is_announced_with_its_size_and_body_8bitmime(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    deliver(mailbox, "Grüße", body="Grüße, 10 € à régler\r\n".encode())
    await forward_once(settings)
    [received] = smtp_sink.received
    assert not received.data.isascii()
    assert "BODY=8BITMIME" in received.mail_options
    assert f"SIZE={len(received.data)}" in received.mail_options


async def test_null_sender_bounce_to_a_list_is_forwarded_and_nothing_else_is_sent(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    raw = build_message(sender="mailer-daemon@remote.example", subject="Undelivered Mail")
    mailbox.deliver(raw, [CONTACT], sender="")
    [(_, _, served)] = mailbox.messages()
    assert served.startswith(b"Return-Path: <>\r\n")
    await forward_once(settings)
    [received] = smtp_sink.received  # the forwarded copy, and no bounce of any kind
    assert (received.mail_from, sorted(received.rcpt_tos)) == (ADMIN, list(CONTACT_MEMBERS))
    assert received.data.endswith(served)
    assert smtp_sink.commands.count("MAIL") == 1


async def test_auto_replied_message_to_a_list_is_forwarded_and_nothing_else_is_sent(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    raw = build_message(subject="Out of office", extra=["Auto-Submitted: auto-replied"])
    mailbox.deliver(raw, [CONTACT])
    [(_, _, served)] = mailbox.messages()
    await forward_once(settings)
    [received] = smtp_sink.received
    assert (received.mail_from, sorted(received.rcpt_tos)) == (ADMIN, list(CONTACT_MEMBERS))
    assert received.data.endswith(served)
    assert smtp_sink.commands.count("MAIL") == 1


async def test_a_forged_delivered_to_in_the_message_does_not_widen_the_delivery(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    raw = b"Delivered-To: direction@example.org\r\n" + build_message(to=CONTACT)
    mailbox.deliver(raw, [CONTACT])  # Dovecot puts Delivered-To: contact@ above it
    await forward_once(settings)
    assert delivered(smtp_sink) == {"alice@example.org": 1, "bob@example.org": 1}


# --------------------------------------------------------------------------- the injectors


@pytest.fixture
def byte_sink() -> Iterator[tuple[socket.socket, list[bytes], threading.Event]]:
    """A TCP server that records everything one client sends, until EOF."""
    listener = socket.create_server(("127.0.0.1", 0))
    chunks: list[bytes] = []
    done = threading.Event()

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                while data := conn.recv(65536):
                    chunks.append(data)
        except OSError:  # closed by the teardown of a test that never connected
            return
        done.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener, chunks, done
    listener.close()
    thread.join(5)


def test_proxy_passes_a_whole_imap_session_through(
    mailbox: MailServer, imap_proxy: FaultProxy
) -> None:
    mailbox.deliver(build_message(body=LONG_BODY), [CONTACT])
    [(_, _, direct)] = mailbox.messages()
    with socket.create_connection((imap_proxy.host, imap_proxy.port), timeout=5) as sock:
        assert sock.makefile("rb").readline().startswith(b"* OK")
    with IMAPClient(imap_proxy.host, port=imap_proxy.port, ssl=False, timeout=5) as client:
        client.login(mailbox.username, mailbox.password)
        client.select_folder("INBOX", readonly=True)
        [(_, data)] = client.fetch(client.search("ALL"), ["BODY.PEEK[]"]).items()
        client.logout()
    assert data[b"BODY[]"] == direct
    assert imap_proxy.accepted == 2


def test_proxy_drop_after_passes_exactly_n_bytes_after_the_marker(
    byte_sink: tuple[socket.socket, list[bytes], threading.Event],
) -> None:
    listener, chunks, done = byte_sink
    host, port = listener.getsockname()
    with FaultProxy(host, port) as proxy:
        fault = proxy.drop_after(4, side="client", after=b"MARK")
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
            sock.sendall(b"hello MARK0123456789")
            assert fault.wait(5)
            assert sock.recv(10) == b""  # the proxy closed the client's end too
    assert done.wait(5)
    assert b"".join(chunks) == b"hello MARK0123"


def test_proxy_fault_marker_may_straddle_two_reads() -> None:
    fault, progress = Fault("server", 5, b"MARK"), _Progress()
    assert progress.cut(fault, b"xxMA") is None
    assert progress.cut(fault, b"RK01") is None  # 2 of the 5 bytes passed
    assert progress.cut(fault, b"2345") == 3


def test_proxy_refuses_then_accepts_again_on_the_same_port(mailbox: MailServer) -> None:
    with FaultProxy(mailbox.host, mailbox.imap_port) as proxy:
        port = proxy.port
        proxy.refuse_connections()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((proxy.host, port), timeout=5)
        proxy.accept_connections()
        assert proxy.port == port
        with socket.create_connection((proxy.host, port), timeout=5) as sock:
            assert sock.makefile("rb").readline().startswith(b"* OK")


def test_proxy_drop_all_closes_every_open_connection(mailbox: MailServer) -> None:
    with FaultProxy(mailbox.host, mailbox.imap_port) as proxy:
        socks = [socket.create_connection((proxy.host, proxy.port), timeout=5) for _ in range(3)]
        for sock in socks:
            assert sock.makefile("rb").readline().startswith(b"* OK")
        assert proxy.drop_all() == 3
        for sock in socks:
            with sock:
                assert sock.recv(10) == b""
        assert proxy.open_connections == 0


RAW = b"From: a@remote.example\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


def test_sink_disconnect_after_data_records_the_bytes_but_never_replies(
    smtp_sink: SmtpSink,
) -> None:
    smtp_sink.disconnect_after_data = 1
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=5) as client:
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.sendmail("a@example.org", ["bob@example.org"], RAW)
        client.close()
    assert [r.data for r in smtp_sink.received_then_dropped] == [RAW]
    assert smtp_sink.received == []
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=5) as client:
        client.sendmail("a@example.org", ["bob@example.org"], RAW)  # only the next one
    assert len(smtp_sink.wait_for(1)) == 1


def test_sink_delay_holds_the_reply_to_that_command(smtp_sink: SmtpSink) -> None:
    smtp_sink.delay["DATA"] = 0.3
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=5) as client:
        client.ehlo()
        client.mail("a@example.org")
        client.rcpt("bob@example.org")
        started = time.monotonic()
        assert client.data(RAW)[0] == 250
        assert time.monotonic() - started >= 0.3


def test_sink_mail_response_and_size_limit(smtp_sink: SmtpSink) -> None:
    smtp_sink.size_limit = 1234
    smtp_sink.mail_response = "452 4.3.1 full"
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=5) as client:
        client.ehlo()
        assert client.esmtp_features["size"] == "1234"
        assert client.mail("a@example.org")[0] == 452
    assert smtp_sink.commands == ["EHLO", "MAIL", "QUIT"]


def test_sink_max_line_length_can_be_raised_to_record_any_line() -> None:
    long_line = RAW + b"x" * 5000 + b"\r\n"
    for limit, code in ((SmtpSink().max_line_length, 500), (10_000, 250)):
        with (
            SmtpSink(max_line_length=limit) as sink,
            smtplib.SMTP(sink.host, sink.port, timeout=5) as client,
        ):
            client.ehlo()
            client.mail("a@example.org")
            client.rcpt("bob@example.org")
            assert client.data(long_line)[0] == code


def test_sink_starttls_transactions_are_marked_tls(starttls_sink: SmtpSink) -> None:
    assert starttls_sink.ca_file is not None
    context = ssl.create_default_context(cafile=str(starttls_sink.ca_file))
    with smtplib.SMTP(starttls_sink.host, starttls_sink.port, timeout=5) as client:
        client.sendmail("a@example.org", ["bob@example.org"], RAW)  # plaintext first
        client.starttls(context=context)
        client.sendmail("a@example.org", ["bob@example.org"], RAW)
    assert [r.tls for r in starttls_sink.wait_for(2)] == [False, True]


@pytest.mark.parametrize(
    ("options", "offered", "mail_code"),
    [
        ({"require_starttls": True}, True, 530),
        ({"offer_starttls": False}, False, 250),
    ],
)
def test_sink_starttls_can_be_required_or_hidden(
    options: dict[str, Any], offered: bool, mail_code: int
) -> None:
    with (
        SmtpSink(tls="starttls", **options) as sink,
        smtplib.SMTP(sink.host, sink.port, timeout=5) as client,
    ):
        client.ehlo()
        assert client.has_extn("starttls") is offered
        assert client.mail("a@example.org")[0] == mail_code


def test_sink_implicit_tls_speaks_tls_from_the_first_byte() -> None:
    with SmtpSink(tls="implicit") as sink:
        assert sink.ca_file is not None
        context = ssl.create_default_context(cafile=str(sink.ca_file))
        with smtplib.SMTP_SSL(sink.host, sink.port, context=context, timeout=5) as client:
            client.sendmail("a@example.org", ["bob@example.org"], RAW)
        assert sink.wait_for(1)[0].tls


def test_sink_stop_closes_open_connections(smtp_sink: SmtpSink) -> None:
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=5) as client:
        client.ehlo()
        assert smtp_sink.open_connections == 1
        smtp_sink.drop_connections()
        assert smtp_sink.open_connections == 0
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
        client.close()


async def test_an_open_message_expunged_by_a_person_is_closed_not_asked_for_again(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.rcpt_responses["bob@example.org"] = "451 4.2.0 mailbox busy"
    deliver(mailbox, "deferred then deleted", body=b"short\r\n")
    await forward_once(settings, now=T0)  # bob deferred: the message stays open
    [(uid, _, _)] = mailbox.messages()
    with mailbox.imap() as client:  # a person deletes it meanwhile
        client.select_folder("INBOX")
        client.delete_messages(client.search("ALL"))
        client.expunge()
        client.logout()
    smtp_sink.rcpt_responses.clear()
    with capture_logs() as first:
        await forward_once(settings, now=LATER)
    with capture_logs() as second:
        await forward_once(settings, now=LATER + 3600)
    assert [e["uids"] for e in first if e["event"] == "messages_expunged"] == [[uid]]
    assert not [e for e in second if e["event"] == "messages_expunged"]
    assert delivered(smtp_sink) == {"alice@example.org": 1}
