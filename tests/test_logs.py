"""The output boundary (forwarder/logs.py): what reaches stdout and stderr, byte for byte.

Secrets are masked in every rendered line, traceback and stderr message; control
characters never reach a terminal raw; under systemd each line carries its
syslog priority, and a real systemd-journald records it at that priority. The
end-to-end versions run a real `forwarder` process.
"""

from __future__ import annotations

import json
import logging
import os
import pty
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from forwarder import redact
from forwarder.logs import configure_logging
from tests.leaks import RAW_CONTROLS, SECRET, spellings
from tests.mail import build_message
from tests.servers import Journald, MailServer, SmtpSink

Configure = Callable[..., None]
LIBRARIES = ("apscheduler", "aiosmtplib", "asyncio", "imapclient")  # levels set by logs.py
PRIORITIES = {"error": "3", "warning": "4", "info": "6", "debug": "7"}  # syslog's, by level
EVIL = "<evil\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x08\r\n\x9b31m\u202e@remote.example>"


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Iterator[Configure]:
    """configure_logging on the captured stdout; logging, hooks and secrets restored after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    libraries = {name: logging.getLogger(name).level for name in LIBRARIES}
    saved = structlog.get_config()
    monkeypatch.setattr(redact, "REDACTOR", redact.Redactor())
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    yield configure_logging
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, library_level in libraries.items():
        logging.getLogger(name).setLevel(library_level)
    structlog.configure(**saved)
    logging.captureWarnings(False)


def log_everything(secret: str) -> None:
    """Log `secret` in every way the program or a library could."""
    log = structlog.get_logger("forwarder.test")
    raw = secret.encode()
    log.info("values", text=f"password {secret}", raw=raw, nested={"a": [secret, (raw,)]})
    log.warning("reprs", error=repr(ValueError(repr(raw))), obj=ValueError(secret))
    log.info(f"event {secret}", **{f"key {secret}": 1})
    try:
        f'"{secret}"'.encode("ascii")  # what imaplib did with a non-ASCII password
    except UnicodeEncodeError as exc:
        log.error("idle_interrupted", error=repr(exc))
        log.exception("with traceback")
    logging.getLogger("imapclient").warning("library %s %r", secret, raw)
    try:
        raise RuntimeError(f"chained {secret!r}") from KeyError(raw)
    except RuntimeError:
        logging.getLogger("aiosmtplib").exception("library traceback")


def leaked_spellings(output: str, secret: str = SECRET) -> list[str]:
    return [name for name, spelt in spellings(secret).items() if spelt in output]


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_secret_is_masked_in_every_line_value_key_and_traceback(
    configure: Configure, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    configure(fmt, "debug", secrets=[SECRET])
    log_everything(SECRET)
    out = capsys.readouterr().out
    assert "library traceback" in out and ("Traceback" in out or '"exception"' in out)
    assert out.count(redact.MASK) >= 10
    assert leaked_spellings(out) == []


def test_json_tracebacks_carry_no_local_variables(
    configure: Configure, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("json", "info")

    def login(password: str) -> None:
        raise ValueError("refused")

    try:
        login("a-local-variable-value")
    except ValueError:
        structlog.get_logger().exception("failed")
    assert "a-local-variable-value" not in capsys.readouterr().out


def test_console_escapes_control_characters_in_values_keys_events_and_library_lines(
    configure: Configure, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("console", "info")
    log = structlog.get_logger("forwarder.cycle")
    log.info("message_forwarded", message_id=EVIL, lists=[EVIL], **{f"k{EVIL}": 1})
    log.info(EVIL)
    logging.getLogger("aiosmtplib").warning("reply %s", EVIL)
    try:
        raise ValueError(EVIL)
    except ValueError:
        log.exception("failed")
    out = capsys.readouterr().out
    assert RAW_CONTROLS.findall(out) == []
    lines = out.splitlines()  # one per event (a traceback keeps its own line breaks)
    escaped = r"<evil\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x08\r\n\x9b31m\u202e@remote.example>"
    assert all(escaped in line for line in lines[:3])
    assert " failed " in lines[3]


def test_json_lines_are_printable_ascii_and_keep_the_value(
    configure: Configure, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("json", "info")
    structlog.get_logger().info(EVIL, message_id=EVIL, **{EVIL: EVIL})
    logging.getLogger("asyncio").warning("%s", EVIL)
    lines = capsys.readouterr().out.splitlines()
    assert all(line.isascii() and line.isprintable() for line in lines)
    first = json.loads(lines[0])
    assert first["event"] == first["message_id"] == first[EVIL] == EVIL


# --------------------------------------------------------------------------- real processes


def forwarder(
    env: dict[str, str], *args: str, **kwargs: object
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "forwarder", *args], env=env, timeout=60, check=False, **kwargs
    )  # type: ignore[call-overload, no-any-return]


def in_a_terminal(env: dict[str, str], *args: str) -> tuple[int, bytes]:
    """Run `forwarder` with stdout and stderr on a pseudo-terminal; everything it wrote."""
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "forwarder", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    output = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the last writer closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    return process.wait(timeout=60), bytes(output)


def test_a_message_id_with_escape_sequences_reaches_the_terminal_escaped(
    mailbox: MailServer, smtp_sink: SmtpSink, env_for_subprocess: dict[str, str]
) -> None:
    mailbox.deliver(build_message(message_id=EVIL.replace("\r\n", "")), ["contact@example.org"])
    del env_for_subprocess["FORWARDER_LOG_FORMAT"]  # a terminal: console, with colours
    status, output = in_a_terminal(env_for_subprocess, "once")
    assert status == 0
    assert len(smtp_sink.received) == 1
    text = output.decode()
    assert "message_forwarded" in text
    # The terminal's own line ends (CR LF) and the renderer's colours (ESC [ ... m) only.
    text = re.sub(r"\x1b\[[0-9;]*m", "", text.replace("\r\n", "\n"))
    assert RAW_CONTROLS.findall(text) == []
    assert r"\x1b]0;pwned\x07\x1b[2j\x1b[31mred\x08\x9b31m\u202e@remote.example" in text


def test_stderr_and_an_uncaught_exception_are_masked_and_escaped(tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text(
        "from forwarder.logs import configure_logging\n"
        f"configure_logging('json', secrets=[{SECRET!r}])\n"
        f"raise RuntimeError({SECRET!r} + {EVIL!r}, {SECRET.encode()!r})\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, timeout=60, check=False
    )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 1
    assert err.count("\n") == 1 and err.startswith("forwarder: unexpected error (RuntimeError)")
    event = json.loads(out)
    assert event["event"] == "unexpected_error" and event["exception"][0]["frames"]
    assert leaked_spellings(out + err) == []
    assert RAW_CONTROLS.findall(err) == []


def journal_stream_of(path: Path) -> str:
    status = path.stat()
    return f"{status.st_dev}:{status.st_ino}"


@pytest.fixture
def debug_env(
    mailbox: MailServer, smtp_sink: SmtpSink, env_for_subprocess: dict[str, str]
) -> dict[str, str]:
    """A message whose cycle logs at every level: one member refused, one deferred."""
    mailbox.deliver(build_message(), ["contact@example.org"])
    smtp_sink.rcpt_responses["alice@example.org"] = "550 5.1.1 no such user"
    smtp_sink.rcpt_responses["bob@example.org"] = "451 4.3.0 try later"
    return dict(env_for_subprocess, FORWARDER_LOG_LEVEL="debug")


def test_each_line_starts_with_its_syslog_priority_when_stdout_is_the_journal_stream(
    debug_env: dict[str, str], tmp_path: Path
) -> None:
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    stdout.touch()
    env = dict(debug_env, JOURNAL_STREAM=journal_stream_of(stdout))
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        assert forwarder(env, "once", stdout=out, stderr=err).returncode == 0
    priorities: dict[str, set[str]] = {}
    for line in stdout.read_text().splitlines():
        match = re.fullmatch(r"<([0-7])>(\{.*\})", line)
        assert match, line
        event = json.loads(match.group(2))
        priorities.setdefault(event["level"], set()).add(match.group(1))
    assert priorities == {level: {priority} for level, priority in PRIORITIES.items()}


def test_the_stderr_line_carries_priority_3_when_stderr_is_the_journal_stream(
    env_for_subprocess: dict[str, str], tmp_path: Path
) -> None:
    env_for_subprocess["FORWARDER_IMAP_PASSWORD"] = "wrong"
    stderr = tmp_path / "stderr"
    stderr.touch()
    env_for_subprocess["JOURNAL_STREAM"] = journal_stream_of(stderr)
    with open(stderr, "wb") as err:
        result = forwarder(env_for_subprocess, "once", stdout=subprocess.PIPE, stderr=err)
    assert result.returncode == 3
    assert re.fullmatch(r"<3>forwarder: IMAP server .* refused the login .*\n", stderr.read_text())
    assert not result.stdout.startswith(b"<")  # stdout is another stream: no prefix


def test_no_priority_prefix_when_journal_stream_names_another_stream(
    mailbox: MailServer, smtp_sink: SmtpSink, env_for_subprocess: dict[str, str], tmp_path: Path
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])  # something to log at info
    other = tmp_path / "other"
    other.touch()
    env_for_subprocess["JOURNAL_STREAM"] = journal_stream_of(other)
    result = forwarder(env_for_subprocess, "once", capture_output=True)
    assert result.returncode == 0
    assert result.stdout.startswith(b"{")


# --------------------------------------------------------------------------- a real journald


def forwarder_into_journal(
    journald: Journald, identifier: str, env: dict[str, str], *args: str
) -> int:
    """Run `forwarder` with stdout and stderr on a journal stream, as systemd does."""
    stream, journal_stream = journald.stream(identifier)
    with stream:
        env = dict(env, JOURNAL_STREAM=journal_stream)
        return forwarder(env, *args, stdout=stream, stderr=stream).returncode


def test_journald_records_each_log_line_at_its_level_and_without_the_prefix(
    debug_env: dict[str, str], journald: Journald
) -> None:
    identifier = "forwarder-levels"
    follower = journald.follow(identifier)
    assert forwarder_into_journal(journald, identifier, debug_env, "once") == 0
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
