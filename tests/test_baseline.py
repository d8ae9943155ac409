"""`forwarder baseline`: an old catch-all marked handled without sending, against the real
Dovecot; the next cycles forward only what arrives after."""

from __future__ import annotations

import io
import time

import pytest

from forwarder.baseline import baseline
from forwarder.config import Settings
from forwarder.pg_store import PgStateStore
from forwarder.service import run_once
from forwarder.sqlite_store import SqliteStateStore
from forwarder.state import UidState
from tests.conftest import MakeSettings, forward_once
from tests.imap_faults import ImapFaultProxy
from tests.mail import build_message
from tests.servers import MailServer, PostgresDatabase, SmtpSink

FORWARDED = b"$Forwarded"
SEEN = b"\\Seen"


async def run_baseline(settings: Settings, *, force: bool = False) -> tuple[int, str]:
    out = io.StringIO()
    status = await baseline(settings, force=force, out=out)
    return status, out.getvalue()


def states(settings: Settings, uidvalidity: int) -> dict[int, UidState]:
    store = SqliteStateStore(settings.state_db, readonly=True)
    try:
        records = store.uid_records("default", uidvalidity, uids=range(1, 1000))
    finally:
        store.close()
    return {r.uid: r.state for r in records}


async def test_baseline_marks_every_message_and_the_next_cycle_sends_none_of_them(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    for _ in range(3):
        mailbox.deliver(build_message(), ["contact@example.org"])
    status, out = await run_baseline(settings)
    assert status == 0
    assert "3 messages marked as handled without sending" in out
    assert "$Forwarded set on them" in out
    assert [flags - {b"\\Recent"} for _, flags, _ in mailbox.messages()] == [{FORWARDED}] * 3
    summary = await forward_once(settings)
    assert (summary.messages, smtp_sink.received) == (0, [])
    mailbox.deliver(build_message(), ["contact@example.org"])
    await forward_once(settings)
    assert len(smtp_sink.received) == 1  # mail after the baseline goes out


async def test_baseline_records_each_message_in_the_state_store(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])
    mailbox.deliver(build_message(to="nobody@example.org"), ["nobody@example.org"])
    await run_baseline(settings)
    assert list(states(settings, mailbox.uidvalidity()).values()) == [UidState.BASELINE] * 2


async def test_baseline_refuses_a_mailbox_already_worked_on(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])
    await forward_once(settings)
    mailbox.deliver(build_message(), ["contact@example.org"])
    status, out = await run_baseline(settings)
    assert status == 1 and out == ""
    error = capsys.readouterr().err
    assert error.startswith("forwarder: mailbox default already has progress in the state store")
    assert error.rstrip().endswith("add --force to mark it anyway")
    await forward_once(settings)
    assert len(smtp_sink.received) == 2  # the waiting message was not marked


async def test_baseline_force_marks_what_waits_and_keeps_final_records(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])
    await forward_once(settings)
    mailbox.deliver(build_message(), ["contact@example.org"])
    status, out = await run_baseline(settings, force=True)
    assert status == 0 and "1 message marked" in out
    assert list(states(settings, mailbox.uidvalidity()).values()) == [
        UidState.DONE,
        UidState.BASELINE,
    ]
    await forward_once(settings)
    assert len(smtp_sink.received) == 1


async def test_baseline_refuses_while_the_service_holds_the_store(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])
    service = SqliteStateStore(settings.state_db)  # as `forwarder run` holds it
    try:
        status, out = await run_baseline(settings)
    finally:
        service.close()
    assert status == 1 and out == ""
    error = capsys.readouterr().err
    assert "is in use by another forwarder process" in error
    assert "stop the service first (systemctl stop forwarder)" in error
    assert FORWARDED not in mailbox.messages()[0][1]


async def test_baseline_on_a_folder_without_keywords_uses_the_state_store_alone(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    imap_faults: ImapFaultProxy,
    make_settings: MakeSettings,
) -> None:
    imap_faults.hide_keywords = True
    settings = make_settings(imap_port=imap_faults.port)
    mailbox.deliver(build_message(), ["contact@example.org"])
    status, out = await run_baseline(settings)
    assert status == 0
    assert "in the state store only (the folder keeps no keywords)" in out
    assert FORWARDED not in mailbox.messages()[0][1]
    await forward_once(settings)
    assert smtp_sink.received == []


async def test_baseline_on_a_postgresql_store_marks_the_folder(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    make_settings: MakeSettings,
    postgres_db: PostgresDatabase,
) -> None:
    settings = make_settings(state_db="", state_url=postgres_db.url)
    mailbox.deliver(build_message(), ["contact@example.org"])
    status, out = await run_baseline(settings)
    assert status == 0 and "1 message marked" in out
    assert await run_once(settings) == 0
    assert smtp_sink.received == []


async def test_baseline_refuses_a_mailbox_leased_by_a_running_instance(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    make_settings: MakeSettings,
    postgres_db: PostgresDatabase,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings(state_db="", state_url=postgres_db.url)
    mailbox.deliver(build_message(), ["contact@example.org"])
    instance = PgStateStore(postgres_db.url)
    try:
        assert instance.acquire_mailboxes("running", ["default"], time.time(), 60) == {"default"}
        status, _ = await run_baseline(settings)
    finally:
        instance.close()
    assert status == 1
    error = capsys.readouterr().err
    assert "mailbox default is being worked by another forwarder instance" in error
    assert FORWARDED not in mailbox.messages()[0][1]
