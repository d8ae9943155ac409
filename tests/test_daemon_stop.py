"""SIGTERM stops `forwarder run` within the documented grace even when a server has gone
silent: what is stuck is shut down, not waited for. The bound asserted is the unit's
TimeoutStopSec (15 s), past which systemd would SIGKILL it; the grace is 8 s."""

from __future__ import annotations

import time

from tests.daemon_process import Daemon
from tests.faults import FaultProxy
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink

TIMEOUT_STOP_SEC = 15.0


def test_sigterm_exits_within_the_grace_when_the_smtp_server_is_silent_after_data(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    daemon_env: dict[str, str],
    start_daemon: type[Daemon],
    smtp_proxy: FaultProxy,
) -> None:
    silent = smtp_proxy.stall_after(0, side="client", after=b"DATA\r\n")  # content never arrives
    for _ in range(3):
        mailbox.deliver(build_message(), ["contact@example.org"])
    daemon = start_daemon({**daemon_env, "FORWARDER_SMTP_PORT": str(smtp_proxy.port)})
    assert silent.wait(20)
    started = time.monotonic()
    status, events, stderr = daemon.stop(timeout=60)
    elapsed = time.monotonic() - started
    assert status == 0, stderr
    assert elapsed < TIMEOUT_STOP_SEC, f"stopped after {elapsed:.1f} s"
    names = [e["event"] for e in events]
    assert "stop_timeout" in names
    assert names[-1] == "stopped"


def test_sigterm_exits_within_the_grace_when_the_imap_server_is_silent_during_fetch(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    daemon_env: dict[str, str],
    start_daemon: type[Daemon],
    imap_proxy: FaultProxy,
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])
    silent = imap_proxy.stall_after(10, side="server", after=b"BODY[] {")
    daemon = start_daemon({**daemon_env, "FORWARDER_IMAP_PORT": str(imap_proxy.port)})
    assert silent.wait(20)
    started = time.monotonic()
    status, events, stderr = daemon.stop(timeout=150)
    elapsed = time.monotonic() - started
    assert status == 0, stderr
    assert elapsed < TIMEOUT_STOP_SEC, f"stopped after {elapsed:.1f} s"
    assert [e["event"] for e in events][-1] == "stopped"
