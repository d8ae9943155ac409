"""`forwarder run` with a mailboxes file: one worker per mailbox, a mailbox that fails never
stops the others, every log line names its mailbox, and a reload adds and removes
mailboxes. The mailboxes are folders of one Dovecot account (a private Dovecot: a refused
login makes Dovecot slow down the next ones from the same address)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_process import Daemon
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink


@pytest.fixture(scope="module")
def own_server() -> Iterator[MailServer]:
    server = MailServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


def table(n: int, *, wrong_password: Path | None = None) -> str:
    """Mailbox `box<n>` reads folder F<n>, with list<n>@ -> member<n>@."""
    lines = [
        "[[mailbox]]",
        f'name = "box{n}"',
        f'folder = "F{n}"',
        f'lists = {{ "list{n}@example.org" = ["member{n}@example.org"] }}',
    ]
    if wrong_password is not None:
        lines += [
            f'imap_username = "{MailServer.username}"',
            f'imap_password_file = "{wrong_password}"',
        ]
    return "\n".join(lines) + "\n\n"


def fill(server: MailServer, numbers: range) -> None:
    """A folder per mailbox, each holding one message to its list."""
    with server.imap() as client:
        for n in numbers:
            if not client.folder_exists(f"F{n}"):
                client.create_folder(f"F{n}")
            client.append(f"F{n}", build_message(to=f"list{n}@example.org", subject=f"to {n}"))
        client.logout()


@pytest.fixture
def many_env(
    own_server: MailServer, env_for_subprocess: dict[str, str], tmp_path: Path
) -> dict[str, str]:
    own_server.clear()
    env = {k: v for k, v in env_for_subprocess.items() if k != "FORWARDER_LISTS"}
    env["FORWARDER_IMAP_PORT"] = str(own_server.imap_port)
    env["FORWARDER_POLL_INTERVAL"] = "3600"
    env["FORWARDER_MAILBOXES_FILE"] = str(tmp_path / "mailboxes.toml")
    return env


def test_fifty_mailboxes_in_one_process_and_a_wrong_password_stops_only_its_own(
    own_server: MailServer,
    smtp_sink: SmtpSink,
    many_env: dict[str, str],
    start_daemon: type[Daemon],
    tmp_path: Path,
) -> None:
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    fill(own_server, range(50))
    Path(many_env["FORWARDER_MAILBOXES_FILE"]).write_text(
        "".join(table(n, wrong_password=wrong if n == 7 else None) for n in range(50))
    )
    daemon = start_daemon(many_env)
    received = smtp_sink.wait_for(49, timeout=60)
    assert sorted(r.rcpt_tos[0] for r in received) == sorted(
        f"member{n}@example.org" for n in range(50) if n != 7
    )
    failed = daemon.wait_for_event("cycle_failed", where=lambda e: e.get("mailbox") == "box7")
    assert failed["error_type"] == "ImapAuthError"
    assert float(str(failed["retry_in"])) >= 240  # refused credentials wait minutes
    daemon.wait_for_event("ready")
    assert daemon.process.poll() is None  # not exit 3: the others go on
    assert smtp_sink.open_connections <= 4  # one pool for the relay they share, not 50
    status, events, stderr = daemon.stop()
    assert status == 0, stderr
    per_mailbox = {"delivery_sent", "message_forwarded", "cycle_finished", "cycle_failed"}
    assert all("mailbox" in e for e in events if e["event"] in per_mailbox)
    assert {e["mailbox"] for e in events if e["event"] == "cycle_failed"} == {"box7"}
    forwarded = {e["mailbox"] for e in events if e["event"] == "message_forwarded"}
    assert forwarded == {f"box{n}" for n in range(50) if n != 7}


def test_a_reload_starts_mailboxes_added_and_stops_those_removed(
    own_server: MailServer,
    smtp_sink: SmtpSink,
    many_env: dict[str, str],
    start_daemon: type[Daemon],
) -> None:
    fill(own_server, range(3))
    mailboxes = Path(many_env["FORWARDER_MAILBOXES_FILE"])
    mailboxes.write_text(table(0) + table(1))
    daemon = start_daemon(many_env)
    smtp_sink.wait_for(2, timeout=30)
    mailboxes.write_text(table(0) + table(2))
    daemon.send(signal.SIGHUP)
    reloaded = daemon.wait_for_event("config_reloaded")
    assert reloaded["mailboxes_added"] == ["box2"]
    assert reloaded["mailboxes_removed"] == ["box1"]
    assert daemon.wait_for_event("mailbox_stopped")["mailbox"] == "box1"
    received = smtp_sink.wait_for(3, timeout=30)
    assert received[2].rcpt_tos == ["member2@example.org"]
    status, _, stderr = daemon.stop()
    assert status == 0, stderr
