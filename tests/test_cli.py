"""The command line as a user runs it: a real `forwarder` process against the test servers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mail import build_message
from tests.servers import MailServer, SmtpSink, free_port

CANARY = "canary-Pa55w0rd-7Q9"


def forwarder(
    env: dict[str, str], *args: str, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forwarder", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def events(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_once_forwards_and_exits_zero(
    mailbox: MailServer, smtp_sink: SmtpSink, env_for_subprocess: dict[str, str]
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])
    result = forwarder(env_for_subprocess, "once")
    assert result.returncode == 0, result.stderr
    assert len(smtp_sink.received) == 1
    assert "message_forwarded" in [e["event"] for e in events(result.stdout)]


def test_logs_are_json_lines_when_stdout_is_not_a_terminal(
    mailbox: MailServer, smtp_sink: SmtpSink, env_for_subprocess: dict[str, str]
) -> None:
    del env_for_subprocess["FORWARDER_LOG_FORMAT"]
    mailbox.deliver(build_message(), ["contact@example.org"])
    result = forwarder(env_for_subprocess, "once")
    lines = result.stdout.splitlines()
    assert lines and all(json.loads(line)["event"] for line in lines)


def test_configuration_error_exits_2_with_one_line_naming_the_variable(
    env_for_subprocess: dict[str, str],
) -> None:
    env_for_subprocess["FORWARDER_LISTS"] = '{"contact@example.org": []}'
    env_for_subprocess["FORWARDER_IMAP_PASSWORD"] = CANARY
    result = forwarder(env_for_subprocess, "once")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "FORWARDER_LISTS" in result.stderr
    assert CANARY not in result.stderr + result.stdout


def test_missing_variable_is_named(env_for_subprocess: dict[str, str]) -> None:
    del env_for_subprocess["FORWARDER_SMTP_HOST"]
    result = forwarder(env_for_subprocess, "check")
    assert result.returncode == 2
    assert "FORWARDER_SMTP_HOST" in result.stderr


def test_unreachable_imap_server_exits_nonzero_naming_it(
    env_for_subprocess: dict[str, str],
) -> None:
    port = free_port()
    env_for_subprocess["FORWARDER_IMAP_PORT"] = str(port)
    result = forwarder(env_for_subprocess, "once")
    assert result.returncode == 1
    assert f"IMAP server 127.0.0.1:{port}" in result.stderr
    assert "refused" in result.stderr


def test_unreachable_smtp_server_exits_nonzero_naming_it(
    env_for_subprocess: dict[str, str],
) -> None:
    port = free_port()
    env_for_subprocess["FORWARDER_SMTP_PORT"] = str(port)
    result = forwarder(env_for_subprocess, "once")
    assert result.returncode == 1
    assert f"SMTP server 127.0.0.1:{port}" in result.stderr


def test_refused_imap_login_exits_3_without_the_password(
    mailbox: MailServer, env_for_subprocess: dict[str, str]
) -> None:
    env_for_subprocess["FORWARDER_IMAP_PASSWORD"] = CANARY
    result = forwarder(env_for_subprocess, "once")
    assert result.returncode == 3
    assert "FORWARDER_IMAP_PASSWORD" in result.stderr
    assert CANARY not in result.stderr + result.stdout


def test_check_prints_the_lists_and_logs_in(
    mailbox: MailServer, smtp_sink: SmtpSink, env_for_subprocess: dict[str, str]
) -> None:
    result = forwarder(env_for_subprocess, "check")
    assert result.returncode == 0, result.stderr
    assert "contact@example.org -> alice@example.org, bob@example.org" in result.stdout
    assert "login ok" in result.stdout


def test_check_fails_when_the_folder_does_not_exist(
    mailbox: MailServer, smtp_sink: SmtpSink, env_for_subprocess: dict[str, str]
) -> None:
    env_for_subprocess["FORWARDER_IMAP_FOLDER"] = "NoSuchFolder"
    result = forwarder(env_for_subprocess, "check")
    assert result.returncode == 1
    assert "NoSuchFolder" in result.stderr and "FORWARDER_IMAP_FOLDER" in result.stderr


def test_state_db_in_a_missing_directory_is_a_clear_error(
    env_for_subprocess: dict[str, str], tmp_path: Path
) -> None:
    env_for_subprocess["FORWARDER_STATE_DB"] = str(tmp_path / "missing" / "state.db")
    result = forwarder(env_for_subprocess, "once")
    assert result.returncode == 1
    assert "does not exist" in result.stderr and "FORWARDER_STATE_DB" in result.stderr


def test_run_forwards_on_its_schedule_and_stops_cleanly_on_sigterm(
    mailbox: MailServer, smtp_sink: SmtpSink, env_for_subprocess: dict[str, str]
) -> None:
    env_for_subprocess["FORWARDER_POLL_INTERVAL"] = "0.2"
    process = subprocess.Popen(
        [sys.executable, "-m", "forwarder", "run"],
        env=env_for_subprocess,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        mailbox.deliver(build_message(), ["contact@example.org"])
        smtp_sink.wait_for(1, timeout=20)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    names = [e["event"] for e in events(stdout)]
    assert names[-1] == "stopped"
    assert "stop_requested" in names


def test_misspelt_variable_is_refused_with_a_suggestion(env_for_subprocess: dict[str, str]) -> None:
    env_for_subprocess["FORWARDER_POLL_INTERVALL"] = "30"
    result = forwarder(env_for_subprocess, "check")
    assert result.returncode == 2
    assert "did you mean FORWARDER_POLL_INTERVAL?" in result.stderr


def test_second_instance_on_the_same_state_file_is_refused(
    mailbox: MailServer, smtp_sink: SmtpSink, env_for_subprocess: dict[str, str]
) -> None:
    from forwarder.sqlite_store import SqliteStateStore

    holder = SqliteStateStore(Path(env_for_subprocess["FORWARDER_STATE_DB"]))
    try:
        result = forwarder(env_for_subprocess, "once")
    finally:
        holder.close()
    assert result.returncode == 1
    assert "in use by another forwarder process" in result.stderr


@pytest.mark.parametrize("command", ["once", "run", "check", "status"])
def test_help_lists_every_command(command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "forwarder", "--help"], capture_output=True, text=True, timeout=30
    )
    assert command in result.stdout
