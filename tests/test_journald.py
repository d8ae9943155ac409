"""What a real systemd-journald records of the forwarder's output: each line at its priority."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.journald import Journald
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink

PRIORITIES = {"error": "3", "warning": "4", "info": "6", "debug": "7"}


def forwarder_into_journal(
    journald: Journald, identifier: str, env: dict[str, str], *args: str
) -> int:
    """Run `forwarder` with stdout and stderr on a journal stream, as systemd does."""
    stream, journal_stream = journald.stream(identifier)
    with stream:
        return subprocess.run(
            [sys.executable, "-m", "forwarder", *args],
            env=dict(env, JOURNAL_STREAM=journal_stream),
            stdin=subprocess.DEVNULL,
            stdout=stream,
            stderr=stream,
            timeout=60,
            check=False,
        ).returncode


def test_journald_records_each_log_line_at_its_level_and_without_the_prefix(
    mailbox: MailServer, smtp_sink: SmtpSink, env_for_subprocess: dict[str, str], journald: Journald
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])
    smtp_sink.rcpt_responses["alice@example.org"] = "550 5.1.1 no such user"
    smtp_sink.rcpt_responses["bob@example.org"] = "451 4.3.0 try later"
    identifier = "forwarder-levels"
    follower = journald.follow(identifier)
    env = dict(env_for_subprocess, FORWARDER_LOG_LEVEL="debug")
    assert forwarder_into_journal(journald, identifier, env, "once") == 0
    entries = follower.wait_for('"cycle_finished"')
    seen = {}
    for entry in entries:
        event = json.loads(entry["MESSAGE"])  # the JSON object alone: the prefix was stripped
        seen.setdefault(event["level"], set()).add(entry["PRIORITY"])
    assert seen == {level: {priority} for level, priority in PRIORITIES.items()}
    errors = journald.query(identifier, "--priority=err")  # journalctl -p err
    assert [json.loads(e["MESSAGE"])["event"] for e in errors] == ["delivery_failed"]


def test_journald_records_the_stderr_error_line_at_priority_err(
    mailbox: MailServer, env_for_subprocess: dict[str, str], journald: Journald
) -> None:
    identifier = "forwarder-stderr"
    follower = journald.follow(identifier)
    env_for_subprocess["FORWARDER_IMAP_PASSWORD"] = "wrong"
    assert forwarder_into_journal(journald, identifier, env_for_subprocess, "once") == 3
    entries = follower.wait_for("forwarder: IMAP server")
    line = next(e for e in entries if e["MESSAGE"].startswith("forwarder: "))
    assert "refused the login" in line["MESSAGE"]
    assert line["PRIORITY"] == "3"
