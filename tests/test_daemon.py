"""`forwarder run` as systemd runs it: a real process, push by IMAP IDLE, outages, sd_notify."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.daemon_process import Daemon
from tests.imap_faults import ImapFaultProxy
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink


def run_to_exit(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`forwarder run` that is expected to stop by itself."""
    return subprocess.run(
        [sys.executable, "-m", "forwarder", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_new_mail_is_forwarded_through_idle_without_waiting_for_the_poll(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    daemon_env: dict[str, str],
    start_daemon: type[Daemon],
) -> None:
    daemon = start_daemon(daemon_env)
    mailbox.deliver(build_message(subject="first"), ["contact@example.org"])
    smtp_sink.wait_for(1, timeout=20)  # the start-up cycle
    mailbox.deliver(build_message(subject="pushed"), ["contact@example.org"])
    received = smtp_sink.wait_for(2, timeout=10)  # far less than the 3600 s poll
    assert b"Subject: pushed" in received[1].data
    status, events, stderr = daemon.stop()
    assert status == 0, stderr
    assert "idle_started" in [e["event"] for e in events]


def test_daemon_survives_a_dovecot_restart(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    daemon_env: dict[str, str],
    start_daemon: type[Daemon],
) -> None:
    daemon = start_daemon(daemon_env)
    mailbox.deliver(build_message(), ["contact@example.org"])
    smtp_sink.wait_for(1, timeout=20)
    mailbox.restart()
    mailbox.deliver(build_message(subject="after restart"), ["contact@example.org"])
    received = smtp_sink.wait_for(2, timeout=30)
    assert b"Subject: after restart" in received[1].data
    status, _, stderr = daemon.stop()
    assert status == 0, stderr


def test_daemon_survives_an_smtp_outage_and_delivers_afterwards(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    env_for_subprocess: dict[str, str],
    start_daemon: type[Daemon],
) -> None:
    env_for_subprocess["FORWARDER_POLL_INTERVAL"] = "2"
    smtp_sink.stop()
    mailbox.deliver(build_message(), ["contact@example.org"])
    daemon = start_daemon(env_for_subprocess)
    daemon.wait_for_event("cycle_failed")
    smtp_sink.start()
    smtp_sink.wait_for(1, timeout=30)
    status, events, stderr = daemon.stop()
    assert status == 0, stderr
    names = [e["event"] for e in events]
    assert "cycle_failed" in names
    assert names.count("message_forwarded") == 1


def test_wrong_password_stops_the_daemon_with_a_clear_error(
    mailbox: MailServer, daemon_env: dict[str, str]
) -> None:
    daemon_env["FORWARDER_IMAP_PASSWORD"] = "wrong"
    result = run_to_exit(daemon_env)
    assert result.returncode == 3
    assert "refused the login" in result.stderr


def test_a_refused_login_exits_3_without_telling_systemd_ready(
    mailbox: MailServer, daemon_env: dict[str, str], tmp_path: Path
) -> None:
    """The unit's promise: `systemctl start` fails on a wrong password (the process exits
    3 before READY), rather than starting a service that dies at once."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        daemon_env["FORWARDER_IMAP_PASSWORD"] = "wrong"
        daemon_env["NOTIFY_SOCKET"] = str(path)
        result = run_to_exit(daemon_env)
        sock.setblocking(False)
        seen: list[str] = []
        with contextlib.suppress(BlockingIOError):
            while True:
                seen += sock.recv(4096).decode().splitlines()
    assert result.returncode == 3, result.stderr
    assert "READY=1" not in seen, seen


def test_connection_limit_at_start_is_retried_not_fatal_and_forwards_once_lifted(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    daemon_env: dict[str, str],
    start_daemon: type[Daemon],
    imap_faults: ImapFaultProxy,
    other_session: threading.Event,
) -> None:
    imap_faults.max_logins = 1  # the other client holds the account's only session
    mailbox.deliver(build_message(), ["contact@example.org"])
    daemon = start_daemon({**daemon_env, "FORWARDER_IMAP_PORT": str(imap_faults.port)})
    failed = daemon.wait_for_event("cycle_failed")
    assert "[LIMIT]" in str(failed["error"])
    assert daemon.process.poll() is None  # not exit 3: still running, retrying
    imap_faults.max_logins = None
    other_session.set()
    smtp_sink.wait_for(1, timeout=30)
    status, events, stderr = daemon.stop()
    assert status == 0, stderr
    assert "fatal_error" not in [e["event"] for e in events]


def test_sigterm_reports_the_run_totals_and_exits_zero(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    daemon_env: dict[str, str],
    start_daemon: type[Daemon],
) -> None:
    for _ in range(3):
        mailbox.deliver(build_message(), ["contact@example.org"])
    daemon = start_daemon(daemon_env)
    smtp_sink.wait_for(3, timeout=20)
    started = time.monotonic()
    status, events, stderr = daemon.stop()
    assert status == 0, stderr
    assert time.monotonic() - started < 10
    stopped = events[-1]
    assert stopped["event"] == "stopped"
    assert (stopped["forwarded"], stopped["delivered"]) == (3, 6)


def test_systemd_is_told_ready_watchdog_status_and_stopping(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    daemon_env: dict[str, str],
    start_daemon: type[Daemon],
    tmp_path: Path,
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(20)
        daemon_env["NOTIFY_SOCKET"] = str(path)
        daemon_env["WATCHDOG_USEC"] = "1000000"
        daemon = start_daemon(daemon_env)
        seen: list[str] = []
        while not {"READY=1", "WATCHDOG=1"} <= set(seen) or not any(
            s.startswith("STATUS=") for s in seen
        ):
            seen += sock.recv(4096).decode().splitlines()
        status, _, stderr = daemon.stop()
        while "STOPPING=1" not in seen:
            seen += sock.recv(4096).decode().splitlines()
    assert status == 0, stderr
    assert seen.index("READY=1") < seen.index("STOPPING=1")
