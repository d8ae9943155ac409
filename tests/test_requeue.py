"""`forwarder retry`: failed and deferred deliveries put back in play, and a message
re-examined with the current lists; the next real cycle sends, the command never does."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from forwarder.config import Settings
from forwarder.requeue import retry
from forwarder.sqlite_store import SqliteStateStore
from tests.conftest import LISTS, MakeSettings, forward_once
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink

NO_SUCH_USER = "550 5.1.1 no such user"


async def run_retry(settings: Settings, **options: object) -> tuple[int, str]:
    out = io.StringIO()
    status = await retry(settings, out=out, **options)  # type: ignore[arg-type]
    return status, out.getvalue()


def recipients(sink: SmtpSink) -> list[str]:
    return sorted(r for received in sink.received for r in received.rcpt_tos)


async def fail_for(
    mailbox: MailServer, sink: SmtpSink, settings: Settings, member: str, **message: str
) -> None:
    """A message forwarded once with `member` refused for good, then the refusal lifted."""
    to = message.pop("to", "compta@example.org")
    mailbox.deliver(build_message(to=to, **message), [to])
    sink.rcpt_responses[member] = NO_SUCH_USER
    await forward_once(settings)
    del sink.rcpt_responses[member]


async def test_retry_failed_has_the_next_cycle_send_the_failed_delivery(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    await fail_for(mailbox, smtp_sink, settings, "carol@example.org")
    await forward_once(settings)
    assert recipients(smtp_sink) == ["bob@example.org"]  # a failure is final by itself
    status, out = await run_retry(settings, failed=True)
    assert status == 0
    assert "mailbox default: 1 delivery re-queued, due now; 1 message reopened" in out
    assert "  carol@example.org  <test-" in out and "was failed " in out
    assert recipients(smtp_sink) == ["bob@example.org"]  # the command sends nothing
    await forward_once(settings)
    assert recipients(smtp_sink) == ["bob@example.org", "carol@example.org"]
    await forward_once(settings)
    assert len(smtp_sink.received) == 2


async def test_retry_member_requeues_only_that_members_deliveries(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    await fail_for(mailbox, smtp_sink, settings, "carol@example.org")
    await fail_for(mailbox, smtp_sink, settings, "dave@example.org", to="direction@example.org")
    smtp_sink.clear()
    status, out = await run_retry(settings, member="Carol@Example.org")
    assert status == 0 and "1 delivery re-queued" in out
    await forward_once(settings)
    assert recipients(smtp_sink) == ["carol@example.org"]


async def test_retry_message_id_requeues_only_that_message(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    await fail_for(mailbox, smtp_sink, settings, "carol@example.org", message_id="<First@X>")
    await fail_for(mailbox, smtp_sink, settings, "carol@example.org", message_id="<second@x>")
    smtp_sink.clear()
    status, out = await run_retry(settings, message_id="<first@x>", member="carol@example.org")
    assert status == 0
    assert "1 delivery re-queued" in out and "<first@x>" in out
    await forward_once(settings)
    assert [b"Message-ID: <First@X>" in r.data for r in smtp_sink.received] == [True]


async def test_retry_uid_routes_a_skipped_message_again_with_the_current_lists(
    mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    mailbox.deliver(build_message(to="info@example.org"), ["info@example.org"])
    await forward_once(make_settings())  # no list info@ yet: skipped
    [(uid, _, _)] = mailbox.messages()
    settings = make_settings(lists=LISTS | {"info@example.org": ["erin@example.org"]})
    await forward_once(settings)
    assert smtp_sink.received == []  # list changes apply to new mail only...
    status, out = await run_retry(settings, uid=uid)
    assert status == 0
    assert f"  uid {uid} reopened (was skipped: unmatched)" in out
    await forward_once(settings)  # ...unless the message is re-examined
    assert recipients(smtp_sink) == ["erin@example.org"]


async def test_retry_of_a_uid_without_a_record_is_one_clear_line(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])
    await forward_once(settings)
    status, _ = await run_retry(settings, uid=999)
    assert status == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("forwarder: mailbox default: no record of UID 999 in the folder")


async def test_retry_refuses_while_the_service_holds_the_store(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await fail_for(mailbox, smtp_sink, settings, "carol@example.org")
    service = SqliteStateStore(settings.state_db)
    try:
        status, _ = await run_retry(settings, failed=True)
    finally:
        service.close()
    assert status == 1
    assert "stop the service first" in capsys.readouterr().err
    await forward_once(settings)
    assert recipients(smtp_sink) == ["bob@example.org"]


def test_retry_needs_to_be_told_which_deliveries(env_for_subprocess: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "forwarder", "retry"],
        env=env_for_subprocess,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--message-id, --member, --failed, --uid" in result.stderr


async def test_retry_is_a_command_that_prints_what_it_requeued(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    settings: Settings,
    env_for_subprocess: dict[str, str],
) -> None:
    await fail_for(mailbox, smtp_sink, settings, "carol@example.org")
    result = subprocess.run(
        [sys.executable, "-m", "forwarder", "retry", "--failed", "--member", "carol@example.org"],
        env=env_for_subprocess,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("{")]
    assert (
        lines[0] == "mailbox default: 1 delivery re-queued, due now; 1 message reopened: the "
        "next cycle fetches them again"
    )
    assert "(550 5.1.1 no such user), attempts 1" in lines[1]
    assert lines[2].endswith("reopened (was failed)")
    assert recipients(smtp_sink) == ["bob@example.org"]  # nothing sent by the command


async def test_retry_says_when_nothing_matches(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    await fail_for(mailbox, smtp_sink, settings, "carol@example.org")
    status, out = await run_retry(settings, member="zoe@example.org")
    assert status == 0
    assert out == "mailbox default: nothing to re-queue (no failed or deferred delivery matches)\n"
