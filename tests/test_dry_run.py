"""`forwarder once --dry-run`: what the next cycle would do, against the real Dovecot, with
nothing sent, recorded or flagged."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from forwarder.config import Settings
from forwarder.dry_run import dry_run
from forwarder.sqlite_store import SqliteStateStore
from tests.conftest import forward_once
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink

LATER = 3600.0  # past the first retry of a deferred member


async def preview(settings: Settings, *, now: float | None = None) -> str:
    out = io.StringIO()
    clock = (lambda: now) if now is not None else time.time
    status = await dry_run(settings, out=out, clock=clock)
    assert status == 0
    return out.getvalue()


async def preview_json(settings: Settings, *, now: float | None = None) -> dict[str, Any]:
    out = io.StringIO()
    clock = (lambda: now) if now is not None else time.time
    assert await dry_run(settings, as_json=True, out=out, clock=clock) == 0
    [box] = json.loads(out.getvalue())["mailboxes"]
    assert isinstance(box, dict)
    return box


def member_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.startswith(("  send", "  skip"))]


def store_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for suffix in ("", "-wal"):
        part = Path(f"{path}{suffix}")
        if part.exists():
            digest.update(part.read_bytes())
    return digest.hexdigest()


async def test_dry_run_prints_who_would_receive_it_and_who_is_left_out(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(
        build_message(to="contact@example.org", cc="bob@example.org"), ["contact@example.org"]
    )
    text = await preview(settings)
    assert "  lists: contact@example.org (matched by delivered-to)" in text
    assert member_lines(text) == [
        "send  alice@example.org",
        "skip  bob@example.org  named in To/Cc: received the original directly",
    ]
    assert "1 to send (1 delivery)" in text
    assert smtp_sink.received == []


async def test_dry_run_sends_records_and_flags_nothing(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])
    await forward_once(settings)
    mailbox.deliver(build_message(), ["contact@example.org"])
    flags_before = [flags for _, flags, _ in mailbox.messages()]
    digest = store_digest(settings.state_db)
    await preview(settings)
    assert [flags for _, flags, _ in mailbox.messages()] == flags_before
    assert store_digest(settings.state_db) == digest
    assert len(smtp_sink.received) == 1
    summary = await forward_once(settings)  # the real cycle still finds the new message
    assert summary.delivered == 2


async def test_dry_run_judges_members_by_what_the_store_knows(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    raw = build_message(to="compta@example.org")
    mailbox.deliver(raw, ["compta@example.org"])
    smtp_sink.rcpt_responses["carol@example.org"] = "451 4.2.0 carol: mailbox busy"
    start = time.time()
    await forward_once(settings, now=start)
    [(uid, _, _)] = mailbox.messages()
    mailbox.deliver(raw, ["compta@example.org"])  # a second copy: new, above the watermark
    text = await preview(settings, now=start + 1)
    copy = member_lines(text)
    assert copy[0].startswith("skip  bob@example.org  already delivered ")
    assert copy[1].startswith("skip  carol@example.org  deferred until ")
    assert "(attempt 2, last reply 451 4.2.0 carol: mailbox busy)" in copy[1]
    assert f"uid {uid}  not due: a member waits for a retry, next at " in text
    due = member_lines(await preview(settings, now=start + LATER))
    retry = "send  carol@example.org  retry (attempt 2, last reply 451 4.2.0 carol: mailbox busy)"
    assert retry in due  # the first copy, open and due now


async def test_dry_run_says_a_failed_member_needs_retry(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    raw = build_message(to="compta@example.org")
    mailbox.deliver(raw, ["compta@example.org"])
    smtp_sink.rcpt_responses["carol@example.org"] = "550 5.1.1 carol: no such user"
    await forward_once(settings)
    mailbox.deliver(raw, ["compta@example.org"])
    [_, carol] = member_lines(await preview(settings))
    assert carol.startswith("skip  carol@example.org  failed ")
    assert carol.endswith("(550 5.1.1 carol: no such user); `forwarder retry` puts it back in play")


async def test_dry_run_sends_two_copies_of_one_message_once(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    raw = build_message(to="contact@example.org, compta@example.org")
    mailbox.deliver(raw, ["contact@example.org", "compta@example.org"])  # two copies
    box = await preview_json(settings)
    first, second = box["messages"]
    assert {m["action"] for m in first["members"]} == {"send"}
    assert {(m["action"], m["reason"]) for m in second["members"]} == {("skip", "copy")}
    assert box["summary"]["deliveries"] == 3  # alice, bob, carol once each


async def test_dry_run_of_an_unmatched_message_shows_the_headers_looked_at(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(build_message(to="nobody@example.org"), ["nobody@example.org"])
    text = await preview(settings)
    assert "  not forwarded: it names no configured list" in text
    at = text.splitlines().index("  looked at, in order:")
    assert text.splitlines()[at + 1 : at + 7] == [
        "    Delivered-To: nobody@example.org",
        "    X-Original-To: (none)",
        "    Envelope-To: (none)",
        "    X-Envelope-To: (none)",
        "    Received (for): nobody@example.org",
        "    To/Cc: nobody@example.org",
    ]


async def test_dry_run_on_a_folder_never_seen_proposes_baseline(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    for _ in range(3):
        mailbox.deliver(build_message(), ["contact@example.org"])
    text = await preview(settings)
    assert "never seen before: the first cycle examines 3 messages" in text
    assert "run `forwarder baseline` first" in text
    assert not settings.state_db.exists()  # a first run's dry run creates no state file


async def test_dry_run_json_gives_each_message_its_route_and_members(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(build_message(sender="alice@example.org"), ["contact@example.org"])
    box = await preview_json(settings)
    [message] = box["messages"]
    assert (message["action"], message["matched_by"]) == ("forward", "delivered-to")
    assert message["lists"] == ["contact@example.org"]
    assert message["sender"] == "alice@example.org"
    assert [(m["address"], m["action"], m["reason"]) for m in message["members"]] == [
        ("bob@example.org", "send", "new"),
        ("alice@example.org", "skip", "sender"),
    ]
    assert (box["mailbox"], box["watermark"], box["new"]) == ("default", None, 1)


async def test_dry_run_reads_next_to_a_running_service(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    await forward_once(settings)
    mailbox.deliver(build_message(), ["contact@example.org"])
    service = SqliteStateStore(settings.state_db)  # holds the lock, as `forwarder run` does
    try:
        text = await preview(settings)
    finally:
        service.close()
    assert "1 new message above UID 0, 0 open and due" in text
    assert "send  alice@example.org" in text


def test_once_dry_run_is_a_command(
    mailbox: MailServer, smtp_sink: SmtpSink, env_for_subprocess: dict[str, str]
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])
    result = subprocess.run(
        [sys.executable, "-m", "forwarder", "once", "--dry-run", "--json"],
        env=env_for_subprocess,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    [box] = json.loads(result.stdout)["mailboxes"]
    assert box["summary"]["deliveries"] == 2
    assert smtp_sink.received == []


def test_once_json_without_dry_run_is_refused(env_for_subprocess: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "forwarder", "once", "--json"],
        env=env_for_subprocess,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "forwarder: --json goes with --dry-run only" in result.stderr


async def test_dry_run_on_a_folder_never_seen_leaves_out_messages_already_forwarded(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])
    mailbox.deliver(build_message(), ["contact@example.org"])
    with mailbox.imap() as client:  # forwarded by a keyword-only (older) forwarder
        client.select_folder("INBOX")
        client.add_flags([min(client.search("ALL"))], [b"$Forwarded"])
        client.logout()
    box = await preview_json(settings)
    assert box["new"] == 1
    assert [m["uid"] for m in box["messages"]] == [max(u for u, _, _ in mailbox.messages())]


async def test_dry_run_escapes_control_characters_from_the_message(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(build_message(message_id="<evil\x1b[2Jid@x>"), ["contact@example.org"])
    text = await preview(settings)
    assert "\x1b" not in text and "<evil\\x1b[2jid@x>" in text
