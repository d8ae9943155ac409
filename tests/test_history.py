"""`forwarder history QUERY`: what the state store knows of a message, a member or a list,
written by real cycles (Dovecot in, the SMTP sink out) and read back read-only."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import pytest

from forwarder.config import Settings
from forwarder.history import history
from forwarder.sqlite_store import SqliteStateStore
from tests.conftest import forward_once
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink

MONDAY = datetime(2026, 11, 23, 9, 30, tzinfo=UTC).timestamp()
FRIDAY = datetime(2026, 11, 20, 16, 0, tzinfo=UTC).timestamp()
TAX_OFFICE = "noreply@impots.example"


async def show(settings: Settings, query: str, **options: Any) -> str:
    out = io.StringIO()
    assert await history(settings, query=query, out=out, **options) == 0
    return out.getvalue()


async def show_json(settings: Settings, query: str, **options: Any) -> dict[str, Any]:
    out = io.StringIO()
    assert await history(settings, query=query, as_json=True, out=out, **options) == 0
    result = json.loads(out.getvalue())
    assert isinstance(result, dict)
    return result


async def forward(mailbox: MailServer, settings: Settings, now: float, **message: str) -> None:
    to = message.pop("to", "compta@example.org")
    mailbox.deliver(build_message(to=to, **message), [to])
    await forward_once(settings, now=now)


async def test_history_of_a_member_answers_did_bob_receive_it_on_monday(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    await forward(mailbox, settings, FRIDAY, sender="someone@partner.example")
    await forward(mailbox, settings, MONDAY, sender=TAX_OFFICE, message_id="<avis-2026@impots>")
    text = await show(settings, "bob@example.org", since="2026-11-23")
    lines = text.splitlines()
    assert lines[0] == (
        "history of bob@example.org (member) since 2026-11-23T00:00:00+00:00: 1 message"
    )
    assert lines[1] == (
        f"<avis-2026@impots>  from {TAX_OFFICE}  to compta@example.org  (mailbox default)"
    )
    assert lines[2].startswith("  uid ") and lines[2].endswith(": done, 2026-11-23T09:30:00+00:00")
    assert lines[3] == (
        "  bob@example.org  delivered  2026-11-23T09:30:00+00:00  attempts 1  250 OK"
    )


async def test_history_of_a_message_id_shows_every_member_and_the_replies(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.rcpt_responses["carol@example.org"] = "550 5.1.1 carol: no such user"
    await forward(mailbox, settings, MONDAY, message_id="<Avis-2026@Impots>")
    result = await show_json(settings, "Avis-2026@impots")
    assert result["matched"] == ["message-id"]
    [message] = result["messages"]
    assert message["message_id"] == "avis-2026@impots"
    assert message["sender"] == "customer@remote.example"
    assert [(d["member"], d["status"], d["code"], d["reply"]) for d in message["deliveries"]] == [
        ("bob@example.org", "delivered", 250, "OK"),
        ("carol@example.org", "failed", 550, "5.1.1 carol: no such user"),
    ]
    assert message["deliveries"][1]["updated"] == "2026-11-23T09:30:00+00:00"
    assert [u["state"] for u in message["uids"]] == ["failed"]


async def test_history_of_a_deferred_delivery_shows_its_next_try(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    smtp_sink.rcpt_responses["carol@example.org"] = "451 4.2.0 busy"
    await forward(mailbox, settings, MONDAY)
    text = await show(settings, "carol@example.org")
    assert (
        "  carol@example.org  deferred   next try 2026-11-23T09:31:00+00:00  attempts 1  " in text
    )


async def test_history_of_a_list_shows_the_messages_sent_to_it(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    await forward(mailbox, settings, FRIDAY, to="contact@example.org")
    await forward(mailbox, settings, MONDAY, to="compta@example.org")
    result = await show_json(settings, "Compta@Example.org")
    assert result["matched"] == ["list"]
    [message] = result["messages"]
    assert message["lists"] == ["compta@example.org"]
    assert {d["member"] for d in message["deliveries"]} == {"bob@example.org", "carol@example.org"}


async def test_history_of_a_skipped_message_shows_its_record(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    await forward(mailbox, settings, MONDAY, to="nobody@example.org", message_id="<lost@x>")
    [(uid, _, _)] = mailbox.messages()
    text = await show(settings, "<lost@x>")
    assert text.splitlines()[1:] == [
        "<lost@x>  from (unknown)  (mailbox default)",
        f"  uid {uid}: skipped (unmatched), 2026-11-23T09:30:00+00:00",
        "  no delivery recorded",
    ]


async def test_history_finds_nothing_without_failing(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    await forward(mailbox, settings, MONDAY)
    assert await show(settings, "zoe@example.org") == "history of zoe@example.org: 0 messages\n"


async def test_history_reads_next_to_a_running_service(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    await forward(mailbox, settings, MONDAY)
    service = SqliteStateStore(settings.state_db)
    try:
        result = await show_json(settings, "bob@example.org")
    finally:
        service.close()
    assert len(result["messages"]) == 1


async def test_history_since_must_be_a_date(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await history(settings, query="bob@example.org", since="monday") == 2
    assert "--since: 'monday' is not an ISO 8601 date or time" in capsys.readouterr().err


def forwarder(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forwarder", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_history_is_a_command(
    mailbox: MailServer, smtp_sink: SmtpSink, env_for_subprocess: dict[str, str]
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])
    forwarder(env_for_subprocess, "once").check_returncode()
    result = forwarder(env_for_subprocess, "history", "alice@example.org", "--json")
    assert result.returncode == 0, result.stderr
    [message] = json.loads(result.stdout)["messages"]
    assert [d["member"] for d in message["deliveries"]] == ["alice@example.org"]


async def test_history_escapes_control_characters_from_the_message(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    await forward(mailbox, settings, MONDAY, message_id="<evil\x1b[2Jid@x>")
    text = await show(settings, "bob@example.org")
    assert "\x1b" not in text and "<evil\\x1b[2jid@x>" in text


def test_history_needs_no_password(
    mailbox: MailServer, smtp_sink: SmtpSink, env_for_subprocess: dict[str, str]
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])
    forwarder(env_for_subprocess, "once").check_returncode()
    for name in ("FORWARDER_IMAP_PASSWORD", "FORWARDER_SMTP_HOST", "FORWARDER_LISTS"):
        del env_for_subprocess[name]
    result = forwarder(env_for_subprocess, "history", "bob@example.org")
    assert result.returncode == 0, result.stderr
    assert "  bob@example.org  delivered  " in result.stdout
