"""`forwarder run` on an account limited to one IMAP connection: the IDLE connection opens
only after the first cycle, and when a second login is refused (or
FORWARDER_IMAP_CONNECTIONS=1 asks for it) new mail is awaited in IDLE on the cycle's own
connection, between cycles. Against the IMAP fault proxy's login limit and against
Dovecot's own `mail_max_userip_connections = 1`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.daemon_process import Daemon
from tests.imap_faults import ImapFaultProxy
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink


def forwards_by_push(mailbox: MailServer, smtp_sink: SmtpSink, daemon: Daemon) -> None:
    """A first message by the start-up cycle, then one pushed by IDLE (the poll is an hour
    away), then the service stops with status 0."""
    mailbox.deliver(build_message(subject="first"), ["contact@example.org"])
    smtp_sink.wait_for(1, timeout=20)
    daemon.wait_for_event("cycle_finished")
    mailbox.deliver(build_message(subject="pushed"), ["contact@example.org"])
    received = smtp_sink.wait_for(2, timeout=20)
    assert b"Subject: pushed" in received[1].data
    status, events, stderr = daemon.stop()
    assert status == 0, stderr
    assert "fatal_error" not in [e["event"] for e in events]


def test_a_refused_second_login_makes_run_idle_on_the_cycle_connection(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    daemon_env: dict[str, str],
    start_daemon: type[Daemon],
    imap_faults: ImapFaultProxy,
) -> None:
    imap_faults.max_logins = 1
    daemon = start_daemon({**daemon_env, "FORWARDER_IMAP_PORT": str(imap_faults.port)})
    switched = daemon.wait_for_event("idle_on_cycle_connection")
    assert "[LIMIT]" in str(switched["reason"])
    forwards_by_push(mailbox, smtp_sink, daemon)
    assert "cycle_failed" not in daemon.names()  # the cycle's login came first


def test_one_imap_connection_when_the_setting_asks_for_it(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    daemon_env: dict[str, str],
    start_daemon: type[Daemon],
    imap_faults: ImapFaultProxy,
) -> None:
    env = {
        **daemon_env,
        "FORWARDER_IMAP_PORT": str(imap_faults.port),
        "FORWARDER_IMAP_CONNECTIONS": "1",
    }
    daemon = start_daemon(env)
    forwards_by_push(mailbox, smtp_sink, daemon)
    assert imap_faults.logins == 1
    assert imap_faults.refused_logins == 0


@pytest.fixture(scope="module")
def one_connection_server() -> Iterator[MailServer]:
    """A Dovecot that lets each user have one IMAP connection per IP."""
    server = MailServer(imap_connections=1)
    try:
        server.start()
        yield server
    finally:
        server.close()


def test_dovecot_limited_to_one_connection_per_user(
    one_connection_server: MailServer,
    smtp_sink: SmtpSink,
    daemon_env: dict[str, str],
    start_daemon: type[Daemon],
) -> None:
    one_connection_server.clear()
    env = {**daemon_env, "FORWARDER_IMAP_PORT": str(one_connection_server.imap_port)}
    daemon = start_daemon(env)
    daemon.wait_for_event("idle_on_cycle_connection")
    forwards_by_push(one_connection_server, smtp_sink, daemon)
