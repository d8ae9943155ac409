"""A disk that fills while `forwarder once` is sending: the state file on a real small
tmpfs (tests/disk.py), filled to the last byte once the SMTP server has taken the first
message, while the next transactions are in flight.

After the first failed commit nothing more is sent, and `once` does not exit with
replies only in memory: it tries to write them again for a while (logging
`state_store_unwritable`), and if it cannot, says how many are lost. The next run
sends nothing twice beyond those.
"""

from __future__ import annotations

import re
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from forwarder import service
from forwarder.service import run_once
from tests.conftest import LISTS, MakeSettings
from tests.disk import SmallDisk
from tests.forwarder_process import ForwarderProcess
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink

CONTACT = "contact@example.org"
MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>", re.M | re.I)
CONNECTIONS = 4  # FORWARDER_SMTP_CONNECTIONS' default


def deliver_backlog(mailbox: MailServer, count: int) -> set[tuple[str, str]]:
    """`count` messages to contact@; the (Message-ID, member) pairs expected."""
    expected: set[tuple[str, str]] = set()
    for i in range(count):
        mid = f"disk-{i}@remote.example"
        mailbox.deliver(build_message(message_id=f"<{mid}>", subject=f"backlog {i}"), [CONTACT])
        expected |= {(mid, member) for member in LISTS[CONTACT]}
    return expected


def pairs(sink: SmtpSink) -> Counter[tuple[str, str]]:
    found: Counter[tuple[str, str]] = Counter()
    for received in list(sink.received):
        match = MESSAGE_ID.search(received.data)
        assert match is not None
        found.update((match.group(1).decode(), rcpt) for rcpt in received.rcpt_tos)
    return found


class FillWhenSending(threading.Thread):
    """Fills the disk as soon as the SMTP server has taken the first transaction, while
    the forwarder has others in flight; `sent` is how many the server had by then."""

    def __init__(self, sink: SmtpSink, disk: SmallDisk) -> None:
        super().__init__(daemon=True)
        self.sink, self.disk = sink, disk
        self.sent = -1
        self.start()

    def run(self) -> None:
        self.sink.wait_for(1, timeout=60)
        self.disk.fill()
        self.sent = len(self.sink.received)

    def done(self) -> int:
        self.join(60)
        assert self.sent >= 1, "the disk was never filled"
        return self.sent


def test_replies_kept_through_a_full_disk_are_written_when_space_returns_none_sent_twice(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    env_for_subprocess: dict[str, str],
    small_disk: SmallDisk,
) -> None:
    expected = deliver_backlog(mailbox, 80)
    env = {**env_for_subprocess, "FORWARDER_STATE_DB": str(small_disk.path / "state.db")}
    smtp_sink.delay["DATA"] = 0.05  # transactions in flight when the disk fills
    filler = FillWhenSending(smtp_sink, small_disk)
    once = ForwarderProcess(env, "once")
    try:
        unwritable = once.wait_for_event("state_store_unwritable")
        at_fill = filler.done()
        small_disk.free()  # space comes back while `once` is still trying
        status, stderr = once.wait()
    finally:
        once.close()
    recovered = [e for e in once.events if e["event"] == "state_store_recovered"]
    first_run = pairs(smtp_sink)
    transactions = len(smtp_sink.received)
    assert status == 1, stderr  # the cycle failed, but no reply was lost
    assert "lost" not in stderr
    assert recovered and recovered[0]["results_written"] == unwritable["replies"]
    # After the first failed commit nothing more goes out: only what was in flight.
    assert transactions <= at_fill + 2 * CONNECTIONS, (at_fill, transactions)

    smtp_sink.delay.clear()
    again = ForwarderProcess(env, "once")
    try:
        status, stderr = again.wait()
    finally:
        again.close()
    assert status == 0, stderr
    received = pairs(smtp_sink)
    print(
        f"\ndisk full: 80 messages, {len(expected)} pairs; disk filled with {at_fill} "
        f"transactions taken, {transactions} sent by the first run "
        f"({sum(first_run.values())} pairs), {unwritable['replies']} replies kept through the "
        f"full disk and written when space came back; duplicates "
        f"{sum(received.values()) - len(received)}"
    )
    assert set(received) == expected
    assert all(n == 1 for n in received.values()), received


async def test_replies_still_unwritable_after_the_wait_are_counted_lost_and_sent_again_once(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    make_settings: MakeSettings,
    small_disk: SmallDisk,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(service, "SAVE_PATIENCE", 1.0)  # 60 s in production
    expected = deliver_backlog(mailbox, 40)
    settings = make_settings(state_db=small_disk.path / "state.db")
    smtp_sink.delay["DATA"] = 0.05
    filler = FillWhenSending(smtp_sink, small_disk)
    with capture_logs() as logs:
        status = await run_once(settings)
    filler.done()
    assert status == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    found = re.search(r"(\d+) replies of the SMTP server could not be written", error)
    assert found is not None, error
    lost = int(found.group(1))
    assert "will be sent again by the next run" in error
    [unwritable] = [e for e in logs if e["event"] == "state_store_unwritable"]
    assert unwritable["replies"] == lost > 0

    small_disk.free()
    smtp_sink.delay.clear()
    assert await run_once(settings) == 0
    received = pairs(smtp_sink)
    print(f"\ndisk full for good: {lost} replies lost, re-sent by the next run")
    assert set(received) == expected
    assert sum(received.values()) - len(received) == lost  # those, and nothing else


def test_a_stop_with_replies_it_cannot_write_says_how_many_are_lost(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    env_for_subprocess: dict[str, str],
    small_disk: SmallDisk,
) -> None:
    """`forwarder run` keeps trying to write them at each cycle; stopped while the disk is
    still full, it tries once more, then logs `replies_lost` with their number."""
    expected = deliver_backlog(mailbox, 40)
    env = {
        **env_for_subprocess,
        "FORWARDER_STATE_DB": str(small_disk.path / "state.db"),
        "FORWARDER_POLL_INTERVAL": "3600",
    }
    smtp_sink.delay["DATA"] = 0.05
    filler = FillWhenSending(smtp_sink, small_disk)
    run = ForwarderProcess(env, "run")
    try:
        run.wait_for_event("cycle_failed")
        filler.done()
        run.send(signal.SIGTERM)
        status, stderr = run.wait()
    finally:
        run.close()
    assert status == 0, stderr
    event = run.wait_for_event("replies_lost")
    found = re.search(r"(\d+) replies of the SMTP server could not be written", str(event["error"]))
    assert found is not None, event
    lost = int(found.group(1))
    assert lost > 0

    small_disk.free()
    smtp_sink.delay.clear()
    again = ForwarderProcess(env, "once")
    try:
        status, stderr = again.wait()
    finally:
        again.close()
    assert status == 0, stderr
    received = pairs(smtp_sink)
    print(f"\nrun stopped on a full disk: {lost} replies lost, re-sent by the next run")
    assert set(received) == expected
    assert sum(received.values()) - len(received) == lost


def test_small_disk_fills_to_the_last_byte_and_frees(small_disk: SmallDisk) -> None:
    small_disk.fill()
    assert small_disk.available == 0
    with pytest.raises(OSError, match="No space left"):
        Path(small_disk.path / "more").write_bytes(b"x" * 8192)
    small_disk.free()
    assert small_disk.available > 0
