"""Crash test: `forwarder once` killed with SIGKILL at random moments while forwarding a backlog.

After every kill the test measures, from outside, the ambiguous window that kill
created: (message, member) pairs the SMTP server accepted but the state store
does not hold as delivered (the reply was lost with the process). Duplicates
can only come from there: their total must not exceed the ambiguous copies (a pair cut
off twice counts twice).
"""

from __future__ import annotations

import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import LISTS
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink

MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>", re.M | re.I)


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
    expected: set[tuple[str, str]] = set()
    for i in range(messages):
        mid = f"crash-{i}@remote.example"
        targets = [
            ["contact@example.org"],
            ["compta@example.org"],
            ["contact@example.org", "compta@example.org"],
        ][i % 3]
        mailbox.deliver(build_message(to=", ".join(targets), message_id=f"<{mid}>"), targets)
        expected |= {(mid, m) for t in targets for m in LISTS[t]}
    smtp_sink.delay = {"DATA": 0.2}  # so that kills land while transactions are in flight

    kills = window_kills = ambiguous_total = runs = 0
    counted: Counter[tuple[str, str]] = Counter()  # copies already counted as ambiguous
    while kills < kills_wanted:
        runs += 1
        process = subprocess.Popen(
            [sys.executable, "-m", "forwarder", "once"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(rng.uniform(0.3, 0.9))  # the moment of the kill, not a readiness wait
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        _, stderr = process.communicate(timeout=30)
        assert process.returncode in (0, -signal.SIGKILL), stderr
        # Every copy received of a pair the store does not hold as delivered is an
        # ambiguous send: a pair cut off twice is counted twice.
        stored = stored_pairs(state_db)
        ambiguous = {
            pair: copies - counted[pair]
            for pair, copies in sink_pairs(smtp_sink).items()
            if pair not in stored and copies > counted[pair]
        }
        if ambiguous:
            window_kills += 1
            ambiguous_total += sum(ambiguous.values())
            counted.update(ambiguous)

    smtp_sink.delay = {}
    during_kills = len(sink_pairs(smtp_sink))
    for _ in range(3):  # finish the backlog without interruption
        result = subprocess.run(
            [sys.executable, "-m", "forwarder", "once"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
    received = sink_pairs(smtp_sink)
    duplicates = sum(received.values()) - len(received)
    print(
        f"\ncrash test: {runs} runs, {kills} SIGKILLs, {window_kills} landed between a DATA "
        f"and its recorded reply ({ambiguous_total} ambiguous pairs); "
        f"{len(expected)} pairs expected, {during_kills} delivered by the killed runs, "
        f"{len(set(received) & expected)} received in all, "
        f"{duplicates} duplicates"
    )
    assert expected <= set(received)  # nothing lost
    assert set(received) <= expected  # RCPT TO only from configured members
    assert duplicates <= ambiguous_total
    assert all(b"$Forwarded" in flags for _, flags, _ in mailbox.messages())
