"""Crash test: the forwarder killed with SIGKILL while forwarding a backlog, at random
moments and at chosen fault points: during a fetch retried in halves around unreadable
messages, while the state file's disk is full, and during a stop (`forwarder run`
SIGTERMed, then SIGKILLed within its grace).

After every run the test measures, from outside, the ambiguous window that run left:
(message, member) pairs the SMTP server accepted but the state store does not hold as
delivered (the reply was lost with the process, or could not be written). Duplicates
can only come from there: their total must not exceed the ambiguous copies (a pair cut
off twice counts twice). Nothing is lost: at the end every expected pair was received.
"""

from __future__ import annotations

import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import LISTS
from tests.disk import SmallDisk
from tests.forwarder_process import ForwarderProcess
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink
from tests.test_imap_source import make_readable

MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>", re.M | re.I)
CONTACT, COMPTA = "contact@example.org", "compta@example.org"
TARGETS = [[CONTACT], [COMPTA], [CONTACT, COMPTA]]
KILLED = -signal.SIGKILL


def sink_pairs(sink: SmtpSink) -> Counter[tuple[str, str]]:
    pairs: Counter[tuple[str, str]] = Counter()
    for received in list(sink.received):
        match = MESSAGE_ID.search(received.data)
        assert match is not None
        for rcpt in received.rcpt_tos:
            pairs[(match.group(1).decode().lower(), rcpt)] += 1
    return pairs


def stored_pairs(state_db: Path) -> set[tuple[str, str]]:
    if not state_db.exists():
        return set()
    with sqlite3.connect(state_db) as db:
        rows = db.execute("SELECT message_id, member FROM deliveries WHERE status = 'delivered'")
        return {(mid, member) for mid, member in rows}


def deliver_backlog(mailbox: MailServer, messages: int) -> dict[str, set[tuple[str, str]]]:
    """`messages` messages for one list or two; each Message-ID's expected pairs."""
    expected: dict[str, set[tuple[str, str]]] = {}
    for i in range(messages):
        mid = f"crash-{i}@remote.example"
        targets = TARGETS[i % 3]
        mailbox.deliver(build_message(to=", ".join(targets), message_id=f"<{mid}>"), targets)
        expected[mid] = {(mid, m) for t in targets for m in LISTS[t]}
    return expected


class Ledger:
    """What the interrupted runs did, measured from outside after each of them."""

    def __init__(self, name: str, sink: SmtpSink, state_db: Path) -> None:
        self.name, self.sink, self.state_db = name, sink, state_db
        self.runs = self.kills = self.window_kills = self.ambiguous = 0
        self.counted: Counter[tuple[str, str]] = Counter()  # copies already counted

    def after_run(self, killed: bool) -> None:
        """Every copy received of a pair the store does not hold as delivered is an
        ambiguous send: a pair cut off twice is counted twice."""
        self.runs += 1
        self.kills += killed
        stored = stored_pairs(self.state_db)
        ambiguous = {
            pair: copies - self.counted[pair]
            for pair, copies in sink_pairs(self.sink).items()
            if pair not in stored and copies > self.counted[pair]
        }
        if ambiguous:
            self.window_kills += 1
            self.ambiguous += sum(ambiguous.values())
            self.counted.update(ambiguous)

    def finish(self, env: dict[str, str], expected: set[tuple[str, str]], note: str = "") -> None:
        """Finish the backlog without interruption; check nothing was lost, and duplicates
        came only from the ambiguous copies."""
        self.sink.delay = {}
        during = len(sink_pairs(self.sink))
        for _ in range(3):
            result = subprocess.run(
                [sys.executable, "-m", "forwarder", "once"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode == 0, result.stderr
        received = sink_pairs(self.sink)
        duplicates = sum(received.values()) - len(received)
        print(
            f"\ncrash test ({self.name}): {self.runs} runs, {self.kills} SIGKILLs, "
            f"{self.window_kills} left an ambiguous window ({self.ambiguous} ambiguous "
            f"copies){note}; {len(expected)} pairs expected, {during} delivered by the "
            f"interrupted runs, {len(set(received) & expected)} received in all, "
            f"{duplicates} duplicates"
        )
        assert expected <= set(received)  # nothing lost
        assert set(received) <= expected  # RCPT TO only from configured members
        assert duplicates <= self.ambiguous


@pytest.mark.parametrize(
    ("messages", "kills_wanted"),
    [
        pytest.param(300, 50, id="300-messages-50-kills"),
        pytest.param(1000, 200, id="1000-messages-200-kills", marks=pytest.mark.soak),
    ],
)
def test_sigkill_at_random_moments_loses_nothing_and_duplicates_only_the_ambiguous(
    messages: int,
    kills_wanted: int,
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    env_for_subprocess: dict[str, str],
    tmp_path: Path,
) -> None:
    rng = random.Random(20261124)
    state_db = tmp_path / "state.db"
    env = {
        **env_for_subprocess,
        "FORWARDER_FETCH_BATCH_MESSAGES": "10",
        "FORWARDER_STATE_DB": str(state_db),
    }
    expected = set().union(*deliver_backlog(mailbox, messages).values())
    smtp_sink.delay = {"DATA": 0.2}  # so that kills land while transactions are in flight
    ledger = Ledger("random moments", smtp_sink, state_db)
    while ledger.kills < kills_wanted:
        run = ForwarderProcess(env, "once")
        try:
            # The moment of the kill: mostly while it sends (counted from its first reply,
            # so that a slow start on a loaded machine does not move every kill before
            # it), sometimes anywhere from its start.
            if rng.random() < 0.25 or run.wait_for_count(("delivery_sent",)):
                time.sleep(rng.uniform(0, 0.6))
            if run.process.poll() is None:
                run.send(signal.SIGKILL)
            status, stderr = run.wait()
        finally:
            run.close()
        assert status in (0, KILLED), stderr
        ledger.after_run(status == KILLED)
    ledger.finish(env, expected)
    assert all(b"$Forwarded" in flags for _, flags, _ in mailbox.messages())


def make_unreadable(mailbox: MailServer, message_ids: set[str]) -> None:
    """chmod 000 the mail files of these messages: Dovecot (running as nobody) cannot
    open them and answers a FETCH that includes one with `* BYE Internal error`."""
    markers = {f"Message-ID: <{mid}>".encode(): mid for mid in message_ids}
    found = set()
    for path in mailbox.maildir.glob("*/*"):  # a message for two lists is stored twice
        if path.is_file() and (hits := [m for m in markers if m in path.read_bytes()]):
            path.chmod(0)
            found.add(markers[hits[0]])
    assert found == message_ids


@pytest.mark.parametrize(
    ("messages", "kills_wanted"),
    [
        pytest.param(100, 15, id="100-messages-15-kills"),
        pytest.param(400, 60, id="400-messages-60-kills", marks=pytest.mark.soak),
    ],
)
def test_sigkill_during_fetch_retries_around_unreadable_messages(
    messages: int,
    kills_wanted: int,
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    env_for_subprocess: dict[str, str],
    tmp_path: Path,
) -> None:
    """One message in ten cannot be read: every batch of ten is refused and fetched again
    in halves (with a new session after each BYE) down to that message. Each run is
    killed a few milliseconds after its k-th refused FETCH (k random), in the middle of
    the halving; a run that meets no refusal any more has quarantined them all."""
    rng = random.Random(20261125)
    state_db = tmp_path / "state.db"
    env = {
        **env_for_subprocess,
        "FORWARDER_FETCH_BATCH_MESSAGES": "10",
        "FORWARDER_STATE_DB": str(state_db),
        "FORWARDER_LOG_LEVEL": "debug",  # fetch_refused is a debug event
    }
    backlog = deliver_backlog(mailbox, messages)
    unreadable = {mid for i, mid in enumerate(backlog) if i % 10 == 7}
    make_unreadable(mailbox, unreadable)
    expected = set().union(*(pairs for mid, pairs in backlog.items() if mid not in unreadable))
    smtp_sink.delay = {"DATA": 0.1}  # the previous batch is being sent meanwhile
    ledger = Ledger("fetch retries", smtp_sink, state_db)
    refusals = 0
    while ledger.kills < kills_wanted:
        run = ForwarderProcess(env, "once")
        try:
            if run.wait_for_count(("fetch_refused",), rng.randint(1, 6)):
                time.sleep(rng.uniform(0, 0.03))  # the moment of the kill inside the retry
                run.send(signal.SIGKILL)
            status, stderr = run.wait()
        finally:
            run.close()
        refusals += run.names().count("fetch_refused")
        assert status in (0, KILLED), stderr
        ledger.after_run(status == KILLED)
        if status == 0 and "fetch_refused" not in run.names():
            break  # every unreadable message is quarantined: no retry left to kill
    ledger.finish(env, expected, f", {refusals} refused FETCHes seen")
    make_readable(mailbox)  # for the test's own FETCH of the flags
    flags = {
        MESSAGE_ID.search(raw).group(1).decode(): f  # type: ignore[union-attr]
        for _, f, raw in mailbox.messages()
    }
    assert {mid for mid, f in flags.items() if b"$ForwarderQuarantine" in f} == unreadable
    assert all(b"$Forwarded" in f for mid, f in flags.items() if mid not in unreadable)
    assert not {mid for mid, _ in sink_pairs(smtp_sink)} & unreadable


class FillDuringSends(threading.Thread):
    """Fills the disk once the SMTP server has taken `after` more transactions."""

    def __init__(self, sink: SmtpSink, disk: SmallDisk, after: int) -> None:
        super().__init__(daemon=True)
        self.sink, self.disk = sink, disk
        self.target = len(sink.received) + after
        self.start()

    def run(self) -> None:
        try:
            self.sink.wait_for(self.target, timeout=30)
        except TimeoutError:
            return  # the run ended first
        self.disk.fill()


@pytest.mark.parametrize(
    ("messages", "kills_wanted"),
    [
        pytest.param(90, 10, id="90-messages-10-kills"),
        pytest.param(300, 40, id="300-messages-40-kills", marks=pytest.mark.soak),
    ],
)
@pytest.mark.parametrize("small_disk", [32 * 1024 * 1024], indirect=True)  # the WAL grows
def test_sigkill_while_the_disk_is_full(
    messages: int,
    kills_wanted: int,
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    env_for_subprocess: dict[str, str],
    small_disk: SmallDisk,
) -> None:
    """The state file on a real tmpfs (32 MiB: room for the WAL of 300 messages), filled
    to the last byte once the server has taken a few more messages; the run, holding
    replies it cannot write (and waiting for space to write them), is killed a moment
    after it says so: those replies are lost, and counted as ambiguous. Space comes back
    before the next run."""
    rng = random.Random(20261126)
    state_db = small_disk.path / "state.db"
    env = {
        **env_for_subprocess,
        "FORWARDER_FETCH_BATCH_MESSAGES": "10",
        "FORWARDER_STATE_DB": str(state_db),
    }
    expected = set().union(*deliver_backlog(mailbox, messages).values())
    smtp_sink.delay = {"DATA": 0.05}
    ledger = Ledger("disk full", smtp_sink, state_db)
    unwritable = 0
    while ledger.kills < kills_wanted:
        filler = FillDuringSends(smtp_sink, small_disk, after=rng.randint(1, 8))
        run = ForwarderProcess(env, "once")
        try:
            if run.wait_for_count(("state_store_unwritable",)):
                unwritable += 1
                time.sleep(rng.uniform(0, 0.5))  # the moment of the kill, within its wait
                run.send(signal.SIGKILL)
            status, stderr = run.wait()
        finally:
            run.close()
            filler.join(30)
            small_disk.free()
        # 1: the disk filled before the claims could be written (nothing held, nothing sent)
        assert status in (0, 1, KILLED), stderr
        ledger.after_run(status == KILLED)
        if status == 0 and set(sink_pairs(smtp_sink)) >= expected:
            break
    ledger.finish(env, expected, f", {unwritable} while holding unwritable replies")
    assert all(b"$Forwarded" in flags for _, flags, _ in mailbox.messages())


@pytest.mark.parametrize(
    ("messages", "stops_wanted"),
    [
        pytest.param(90, 8, id="90-messages-8-stops"),
        pytest.param(300, 30, id="300-messages-30-stops", marks=pytest.mark.soak),
    ],
)
def test_sigkill_during_a_stop(
    messages: int,
    stops_wanted: int,
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    env_for_subprocess: dict[str, str],
    tmp_path: Path,
) -> None:
    """`forwarder run` is sent SIGTERM while it sends, and SIGKILL a moment later, within
    the 8 s it gives the messages in flight: killed while finishing them, or after."""
    rng = random.Random(20261127)
    state_db = tmp_path / "state.db"
    env = {
        **env_for_subprocess,
        "FORWARDER_FETCH_BATCH_MESSAGES": "10",
        "FORWARDER_STATE_DB": str(state_db),
        "FORWARDER_POLL_INTERVAL": "3600",
    }
    expected = set().union(*deliver_backlog(mailbox, messages).values())
    smtp_sink.delay = {"DATA": 0.2}  # transactions in flight when the stop comes
    ledger = Ledger("stops", smtp_sink, state_db)
    stops = clean = 0
    while stops < stops_wanted:
        run = ForwarderProcess(env, "run")
        try:
            run.wait_for_count(("delivery_sent", "ready"))
            time.sleep(rng.uniform(0, 0.3))  # the moment of the stop
            run.send(signal.SIGTERM)
            stops += 1
            try:
                status, stderr = run.wait(timeout=rng.uniform(0, 2.0))
            except subprocess.TimeoutExpired:  # still finishing: killed within its grace
                run.send(signal.SIGKILL)
                status, stderr = run.wait()
        finally:
            run.close()
        assert status in (0, KILLED), stderr
        clean += status == 0
        ledger.after_run(status == KILLED)
    ledger.finish(env, expected, f", {stops} SIGTERMs, {clean} clean stops")
    assert all(b"$Forwarded" in flags for _, flags, _ in mailbox.messages())
