"""IMAP servers that refuse, limit or cannot read: logins classified by what the server
said (RFC 5530), connection limits retried instead of fatal, an unreadable message
quarantined while the others are forwarded. Real Dovecot, behind ImapFaultProxy where
a provider's behaviour is needed."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from structlog.testing import capture_logs

from forwarder.errors import (
    EXIT_AUTH,
    EXIT_RUNTIME,
    ImapAuthError,
    ImapBusyError,
    ImapError,
)
from forwarder.idle import IdleWatcher
from forwarder.imap_source import FORWARDED, QUARANTINE
from tests.conftest import MakeSettings, forward_once, imap_source
from tests.imap_faults import ImapFaultProxy, Refusal
from tests.mail import build_message
from tests.servers import LOOPBACK, MailServer, SmtpSink
from tests.test_imap_source import make_readable, make_unreadable

CONTACT = "contact@example.org"


# --------------------------------------------------------------------------- login refusals


@pytest.mark.parametrize("refusal", ["limit", "unavailable", "wording", "bye", "greeting"])
def test_second_login_refused_for_now_is_a_busy_error_not_refused_credentials(
    refusal: Refusal,
    imap_faults: ImapFaultProxy,
    other_session: threading.Event,
    make_settings: MakeSettings,
) -> None:
    imap_faults.max_logins, imap_faults.refusal = 1, refusal
    source = imap_source(make_settings(imap_port=imap_faults.port))
    with pytest.raises(ImapBusyError) as error:
        source.connect()
    assert imap_faults.refused_logins == 1
    assert not isinstance(error.value, ImapAuthError)
    assert error.value.exit_status == EXIT_RUNTIME
    assert f"{imap_faults.host}:{imap_faults.port}" in str(error.value)
    assert "FORWARDER_IMAP_PASSWORD" not in str(error.value)
    assert not source.connected


def test_second_session_refused_by_dovecot_connection_limit_is_a_busy_error(
    make_settings: MakeSettings,
) -> None:
    with MailServer(imap_connections=1) as server:
        settings = make_settings(imap_port=server.imap_port)
        first = imap_source(settings)
        first.connect()
        try:
            with pytest.raises(ImapBusyError) as error:
                imap_source(settings).connect()
        finally:
            first.close()
        assert "[LIMIT]" in str(error.value)


def test_wrong_password_is_refused_credentials_naming_the_settings(
    make_settings: MakeSettings,
) -> None:
    # A Dovecot of its own: after a failed login Dovecot slows the next ones from the IP.
    with MailServer() as server:
        source = imap_source(make_settings(imap_port=server.imap_port, imap_password="wrong-pw"))
        with pytest.raises(ImapAuthError) as error:
            source.connect()
    assert error.value.exit_status == EXIT_AUTH
    assert "[AUTHENTICATIONFAILED]" in str(error.value)
    assert "FORWARDER_IMAP_PASSWORD" in str(error.value)
    assert "wrong-pw" not in str(error.value)


async def test_idle_watcher_refused_for_now_ends_with_busy_and_wakes_the_worker(
    imap_faults: ImapFaultProxy, other_session: threading.Event, make_settings: MakeSettings
) -> None:
    imap_faults.max_logins = 1
    woken = asyncio.Event()
    watcher = IdleWatcher(make_settings(imap_port=imap_faults.port).mailboxes()[0].imap, woken.set)
    with capture_logs() as events:
        await asyncio.wait_for(watcher.run(), 20)  # the worker then idles on its own connection
    assert watcher.busy is not None and "[LIMIT]" in str(watcher.busy)
    assert woken.is_set()
    assert "idle_failed" not in [e["event"] for e in events]


@pytest.mark.parametrize("security", ["tls", "starttls", "none"])
def test_a_server_that_accepts_but_never_greets_is_named_not_taken_for_tls(
    security: str, mailbox: MailServer, make_settings: MakeSettings
) -> None:
    with socket.socket() as silent:  # the kernel accepts; nobody ever answers
        silent.bind((LOOPBACK, 0))
        silent.listen(8)
        settings = make_settings(
            imap_port=silent.getsockname()[1], imap_security=security, imap_timeout=0.5
        )
        with pytest.raises(ImapError) as error:
            imap_source(settings).connect()
    assert "connected, but no IMAP greeting within 0.5 s" in str(error.value)
    assert "FORWARDER_IMAP_SECURITY" not in str(error.value)


# --------------------------------------------------------------------------- unreadable mail


async def test_one_unreadable_message_is_quarantined_and_the_others_are_forwarded(
    mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    for n in range(21):
        mailbox.deliver(build_message(subject=f"n{n}"), [CONTACT])
    uids = [uid for uid, _flags, _raw in mailbox.messages()]
    bad = uids[3]
    make_unreadable(mailbox, bad)
    with capture_logs() as events:
        summary = await forward_once(make_settings())
    assert len(smtp_sink.received) == 20 and summary.quarantined == 1
    quarantined = [e for e in events if e["event"] == "message_quarantined"]
    assert [e["uid"] for e in quarantined] == [bad]
    assert "cannot give the message" in quarantined[0]["reason"]
    make_readable(mailbox)
    flags = {uid: f for uid, f, _raw in mailbox.messages()}
    assert QUARANTINE in flags[bad]
    assert all(b"$Forwarded" in f for uid, f in flags.items() if uid != bad)


# --------------------------------------------------------------------------- keywords


async def test_folder_without_keywords_forwards_each_message_exactly_once(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    imap_faults: ImapFaultProxy,
    make_settings: MakeSettings,
) -> None:
    """The state store remembers what was examined: keywords are only marks for people."""
    imap_faults.hide_keywords = True
    settings = make_settings(imap_port=imap_faults.port)
    mailbox.deliver(build_message(subject="first"), [CONTACT])
    await forward_once(settings)
    mailbox.deliver(build_message(subject="second"), [CONTACT])
    await forward_once(settings)
    await forward_once(settings)
    subjects = [r.data.split(b"Subject: ")[1].split(b"\r\n")[0] for r in smtp_sink.received]
    assert [s.split(b" ")[0] for s in subjects] == [b"first", b"second"]
    assert all(FORWARDED not in flags for _, flags, _ in mailbox.messages())


@pytest.mark.parametrize("store", ["no", "bad", "forget"])
async def test_keywords_the_server_does_not_keep_never_cause_a_second_send(
    store: str,
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    imap_faults: ImapFaultProxy,
    make_settings: MakeSettings,
) -> None:
    imap_faults.keyword_store = store  # type: ignore[assignment]
    settings = make_settings(imap_port=imap_faults.port)
    mailbox.deliver(build_message(), [CONTACT])
    for _ in range(3):
        await forward_once(settings)
    assert len(smtp_sink.received) == 1
