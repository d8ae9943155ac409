"""Durability: the state store comes first, and one bad message never blocks the others."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import forwarder.plan
from forwarder.config import Settings
from forwarder.errors import StateError
from forwarder.sqlite_store import SqliteStateStore
from forwarder.state import MessageResult
from tests.conftest import MakeSettings, forward_once, make_forwarder
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink

FORWARDED = b"$Forwarded"
QUARANTINE = b"$ForwarderQuarantine"


class FlakyStore(SqliteStateStore):
    """The real SQLite store, whose result commits fail while `full` is set."""

    full = False

    def record_results(self, mailbox: str, results: Sequence[MessageResult], now: float) -> None:
        if self.full:
            raise StateError(f"state store {self.path}: write failed (database or disk is full)")
        super().record_results(mailbox, results, now)


async def test_unwritable_state_store_sends_nothing_and_leaves_the_message(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])
    store = SqliteStateStore(settings.state_db)
    store._db.execute("PRAGMA query_only = ON")  # every write now fails, as on a full disk
    fwd = make_forwarder(settings, store)
    try:
        with pytest.raises(StateError, match="write failed"):
            await fwd.run_cycle()
        assert smtp_sink.received == []
        [(_, flags, _)] = mailbox.messages()
        assert flags == set()
        store._db.execute("PRAGMA query_only = OFF")  # space is back
        await fwd.run_cycle()
    finally:
        await fwd.close()
        store.close()
    assert len(smtp_sink.received) == 1
    [(_, flags, _)] = mailbox.messages()
    assert FORWARDED in flags


async def test_results_that_could_not_be_committed_are_written_first_and_not_resent(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])
    store = FlakyStore(settings.state_db)
    fwd = make_forwarder(settings, store)
    try:
        store.full = True
        with pytest.raises(StateError):
            await fwd.run_cycle()
        assert len(smtp_sink.received) == 1  # sent, but its result is only in memory
        [(_, flags, _)] = mailbox.messages()
        assert FORWARDED not in flags  # never marked before the result is durable
        store.full = False
        with capture_logs() as logs:
            await fwd.run_cycle()
    finally:
        await fwd.close()
        store.close()
    assert len(smtp_sink.received) == 1
    assert "state_store_recovered" in [e["event"] for e in logs]
    [(_, flags, _)] = mailbox.messages()
    assert FORWARDED in flags


async def test_unexpected_error_on_one_message_quarantines_it_and_the_rest_go_on(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_key = forwarder.plan.message_key

    def exploding_key(header_block: bytes, *args: object) -> str:
        if b"Subject: poison" in header_block:
            raise RuntimeError("boom")
        return real_key(header_block, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(forwarder.plan, "message_key", exploding_key)
    mailbox.deliver(build_message(subject="poison"), ["contact@example.org"])
    mailbox.deliver(build_message(subject="fine"), ["contact@example.org"])
    with capture_logs() as logs:
        summary = await forward_once(settings)
    assert len(smtp_sink.received) == 1 and b"Subject: fine" in smtp_sink.received[0].data
    poison, fine = mailbox.messages()
    assert poison[1] == {QUARANTINE}
    assert FORWARDED in fine[1]
    [event] = [e for e in logs if e["event"] == "message_quarantined"]
    assert event["reason"] == "boom"
    assert summary.quarantined == 1
    await forward_once(settings)  # not looked at again
    assert len(smtp_sink.received) == 1


async def test_pending_rows_of_an_interrupted_run_are_sent_and_counted(
    mailbox: MailServer, smtp_sink: SmtpSink, settings: Settings
) -> None:
    mailbox.deliver(build_message(), ["contact@example.org"])
    store = FlakyStore(settings.state_db)
    fwd = make_forwarder(settings, store)
    store.full = True  # as if killed between the server's reply and the commit
    with pytest.raises(StateError):
        await fwd.run_cycle()
    await fwd.close()
    store.close()
    with capture_logs() as logs:
        await forward_once(settings)  # a new process: what was in memory is gone
    [event] = [e for e in logs if e["event"] == "message_forwarded"]
    assert event["interrupted"] == 2  # the ambiguous window, reported
    assert len(smtp_sink.received) == 2


def test_state_store_is_wal_with_full_fsync(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "s.db")
    try:
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        store.close()


async def test_messages_waiting_for_a_connection_are_not_sent_after_a_failed_commit(
    mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings
) -> None:
    for n in range(20):
        mailbox.deliver(build_message(subject=f"queued {n}"), ["direction@example.org"])
    settings = make_settings(smtp_connections=1)
    smtp_sink.delay["DATA"] = 0.1  # a transaction lasts longer than a commit
    store = FlakyStore(settings.state_db)
    fwd = make_forwarder(settings, store)
    real_record = store.record_results
    sent_at_failure: list[int] = []

    def fill_up_after_the_first(box: str, results: Sequence[MessageResult], now: float) -> None:
        if store.full and not sent_at_failure:
            sent_at_failure.append(len(smtp_sink.received))
        real_record(box, results, now)
        store.full = True  # the disk is full from now on

    store.record_results = fill_up_after_the_first  # type: ignore[method-assign]
    try:
        with pytest.raises(StateError):
            await fwd.run_cycle()
    finally:
        await fwd.close()
        store.close()
    # The first commit fills the disk; the next one fails. After that failure, at most
    # the transaction in flight on the one connection finishes, and the one that took
    # the connection before the failure was seen; not the queue. (How many went out
    # while the first commit was being written depends on the disk's speed.)
    [sent] = sent_at_failure
    assert len(smtp_sink.received) <= sent + 2 < 20


def test_the_write_ahead_log_is_cut_back_after_a_checkpoint(tmp_path: Path) -> None:
    """A small disk keeps its space: the WAL does not stay at its high-water mark."""
    from forwarder.state import UidRecord, UidState

    path = tmp_path / "s.db"
    store = SqliteStateStore(path)
    try:
        big = [UidRecord(n, UidState.SKIPPED, reason="x" * 200) for n in range(30_000)]
        store.record_uids("default", 1, big, 1.0)  # one transaction: an 8 MB WAL, checkpointed
        store.record_uids("default", 1, [UidRecord(99_999, UidState.DONE)], 2.0)  # WAL restarts
        wal = path.with_name(path.name + "-wal")
        assert wal.stat().st_size <= 1024 * 1024 + 64 * 1024
    finally:
        store.close()
