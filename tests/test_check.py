"""`forwarder check`: IMAP and SMTP each tried and reported on its own line; the exit
status is the worst of the two."""

from __future__ import annotations

import subprocess
import sys

from tests.servers import MailServer, SmtpSink, free_port

CANARY = "canary-Pa55w0rd-7Q9"


def check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forwarder", "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("forwarder: ")]


def test_check_reports_imap_when_the_smtp_server_is_unreachable(
    mailbox: MailServer, smtp_sink: SmtpSink, env_for_subprocess: dict[str, str]
) -> None:
    port = free_port()
    env_for_subprocess["FORWARDER_SMTP_PORT"] = str(port)
    result = check(env_for_subprocess)
    assert result.returncode == 1
    assert f"IMAP server {mailbox.host}:{mailbox.imap_port}: login ok" in result.stdout
    [error] = errors(result.stderr)
    assert error.startswith(f"forwarder: SMTP server 127.0.0.1:{port}: ")


def test_check_reports_smtp_when_the_imap_login_is_refused(
    mailbox: MailServer, smtp_sink: SmtpSink, env_for_subprocess: dict[str, str]
) -> None:
    env_for_subprocess["FORWARDER_IMAP_PASSWORD"] = CANARY
    result = check(env_for_subprocess)
    assert result.returncode == 3
    assert f"SMTP server {smtp_sink.host}:{smtp_sink.port}: connection ok" in result.stdout
    [error] = errors(result.stderr)
    assert error.startswith(f"forwarder: IMAP server {mailbox.host}:{mailbox.imap_port}: ")
    assert CANARY not in result.stdout + result.stderr


def test_check_exits_with_the_worst_of_both_statuses(
    mailbox: MailServer, smtp_sink: SmtpSink, env_for_subprocess: dict[str, str]
) -> None:
    env_for_subprocess["FORWARDER_IMAP_PASSWORD"] = CANARY  # exit status 3
    env_for_subprocess["FORWARDER_SMTP_PORT"] = str(free_port())  # exit status 1
    result = check(env_for_subprocess)
    assert result.returncode == 3
    imap, smtp = errors(result.stderr)
    assert imap.startswith("forwarder: IMAP server") and smtp.startswith("forwarder: SMTP server")
    assert "login ok" not in result.stdout
