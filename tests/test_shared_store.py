"""Several instances on one PostgreSQL: a database outage mid-cycle, and two `forwarder run`
processes on one backlog, the one holding the mailbox SIGKILLed at random moments.

As in tests/test_crash.py, the ambiguous window is measured from outside after every
kill: (message, member) pairs the SMTP server accepted but the store does not hold as
delivered. Duplicates can only come from there.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from forwarder.errors import StateError
from forwarder.factory import build_forwarder, open_store
from forwarder.mailbox_leases import MailboxLeases
from forwarder.pg_store import PgStateStore
from forwarder.state import MessageResult
from tests.conftest import LISTS, MakeSettings
from tests.forwarder_process import Event, ForwarderProcess
from tests.mail import build_message
from tests.servers import MailServer, PostgresDatabase, SmtpSink
from tests.test_crash import sink_pairs

TARGETS = [
    ["contact@example.org"],
    ["compta@example.org"],
    ["contact@example.org", "compta@example.org"],
]


def fill(mailbox: MailServer, count: int, tag: str) -> set[tuple[str, str]]:
    """`count` messages for overlapping lists; the (message, member) pairs expected."""
    expected: set[tuple[str, str]] = set()
    for i in range(count):
        mid = f"{tag}-{i}@remote.example"
        targets = TARGETS[i % 3]
        mailbox.deliver(build_message(to=", ".join(targets), message_id=f"<{mid}>"), targets)
        expected |= {(mid, m) for t in targets for m in LISTS[t]}
    return expected


def stored_pairs(db: PostgresDatabase) -> set[tuple[str, str]]:
    rows = db.sql("SELECT message_id, member FROM forwarder.deliveries WHERE status = 'delivered'")
    return {(mid, member) for mid, member in rows}


async def test_a_database_outage_fails_the_cycle_in_one_line_and_the_next_one_duplicates_nothing(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    postgres_db: PostgresDatabase,
    make_settings: MakeSettings,
) -> None:
    expected = fill(mailbox, 60, "outage")
    lease = 0.5  # the claims the failed cycle could not give back end with it
    settings = make_settings(
        state_db="", state_url=postgres_db.url, takeover_after=lease, smtp_connections=2
    )
    store = open_store(settings)
    forwarder = build_forwarder(settings, settings.mailboxes()[0], store)
    failed_commits: list[int] = []  # transactions the sink had received at each failed commit
    real_record = store.record_results

    def record_results(box: str, results: list[MessageResult], now: float) -> None:
        try:
            real_record(box, results, now)
        except StateError:
            failed_commits.append(len(smtp_sink.received))
            raise

    store.record_results = record_results  # type: ignore[method-assign]
    smtp_sink.delay = {"DATA": 0.2}
    try:
        cycle = asyncio.create_task(forwarder.run_cycle())
        await asyncio.to_thread(smtp_sink.wait_for, 5, 60)
        await asyncio.to_thread(postgres_db.cluster.stop, "immediate")  # a crash: quick
        with pytest.raises(StateError) as lost:
            await cycle
        stopped_at = time.monotonic()
        sent_during_outage = len(smtp_sink.received)
        await asyncio.to_thread(postgres_db.cluster.start)
        await asyncio.sleep(max(0.0, stopped_at + lease - time.monotonic()))  # claims end
        smtp_sink.delay = {}
        await forwarder.run_cycle()
    finally:
        await forwarder.close()
        store.close()

    line = str(lost.value)
    assert f"{postgres_db.host}:{postgres_db.port}" in line and "FORWARDER_STATE_URL" in line
    assert "\n" not in line and postgres_db.password not in line
    assert failed_commits, "the outage should have failed a commit"
    # After the first failed commit, only the transactions already in flight complete.
    assert sent_during_outage - failed_commits[0] <= settings.mailboxes()[0].smtp.connections
    assert sent_during_outage < 60  # some were left for the cycle after the outage
    received = sink_pairs(smtp_sink)
    assert set(received) == expected
    assert sum(received.values()) == len(expected)  # the unsaved results were written first
    assert all(b"$Forwarded" in flags for _, flags, _ in mailbox.messages())


# Two `forwarder run` processes ---------------------------------------------------------


class Instance:
    """One `forwarder run` (tests/forwarder_process.py), started again after a kill; the
    events of every process it ran."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.env = env
        self.process: ForwarderProcess | None = None
        self.past: list[Event] = []

    def start(self) -> None:
        self.process = ForwarderProcess(self.env, "run")

    @property
    def pid(self) -> int | None:
        running = self.process is not None and self.process.process.poll() is None
        return self.process.process.pid if running and self.process else None

    def signal(self, signum: signal.Signals, timeout: float = 60) -> int:
        assert self.process is not None
        self.process.send(signum)
        status, _ = self.process.wait(timeout)
        self.past += self.process.events
        self.process.close()
        self.process = None
        return status

    def events(self) -> list[Event]:
        return self.past + (list(self.process.events) if self.process else [])


def holder(db: PostgresDatabase) -> tuple[int, float] | None:
    """(pid, seconds left) of the owner of the mailbox's lease, if it is live."""
    rows = db.sql(
        "SELECT owner, extract(epoch FROM until - clock_timestamp()) FROM "
        "forwarder.mailbox_leases WHERE mailbox = 'default' AND until > clock_timestamp()"
    )
    if not rows:
        return None
    owner, left = rows[0]
    return int(owner.split("/")[1]), float(left)


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


TAKEOVER_AFTER = 2.0  # short: the kill test waits for takeovers
STEADY_TAKEOVER_AFTER = 30.0  # long: no lease may end under load in a test without kills


@pytest.fixture
def two_instances(
    request: pytest.FixtureRequest,
    env_for_subprocess: dict[str, str],
    postgres_db: PostgresDatabase,
) -> Iterator[tuple[Instance, Instance]]:
    """Two `forwarder run` on one database; the lease is the test's `takeover_after`
    parameter (indirect), TAKEOVER_AFTER by default."""
    env = {k: v for k, v in env_for_subprocess.items() if k != "FORWARDER_STATE_DB"}
    env |= {
        "FORWARDER_STATE_URL": postgres_db.url,
        "FORWARDER_TAKEOVER_AFTER": str(getattr(request, "param", TAKEOVER_AFTER)),
        "FORWARDER_POLL_INTERVAL": "1",
        "FORWARDER_FETCH_BATCH_MESSAGES": "10",
    }
    PgStateStore(postgres_db.url).close()  # the schema, so that the test can watch the leases
    instances = (Instance("a", env), Instance("b", env))
    yield instances
    for instance in instances:
        if instance.pid is not None:
            instance.signal(signal.SIGKILL)


def test_two_instances_whose_lease_holder_is_killed_at_random_send_each_pair_once(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    postgres_db: PostgresDatabase,
    two_instances: tuple[Instance, Instance],
) -> None:
    rng = random.Random(20261126)
    expected = fill(mailbox, 300, "pair")
    smtp_sink.delay = {"DATA": 0.2}  # so that kills land while transactions are in flight
    by_pid: dict[int, Instance] = {}
    for instance in two_instances:
        instance.start()
        assert instance.pid is not None
        by_pid[instance.pid] = instance

    kills = window_kills = ambiguous_total = 0
    takeovers: list[float] = []
    counted: Counter[tuple[str, str]] = Counter()
    while kills < 10 and len(sink_pairs(smtp_sink)) < len(expected):
        wait_until(lambda: holder(postgres_db) is not None, 60, "an instance holds the mailbox")
        time.sleep(rng.uniform(0.2, 1.2))  # the moment of the kill, not a readiness wait
        found = holder(postgres_db)
        if found is None or found[0] not in by_pid:
            continue
        victim = by_pid.pop(found[0])
        assert victim.signal(signal.SIGKILL) == -signal.SIGKILL
        killed_at = time.monotonic()
        kills += 1
        received = sink_pairs(smtp_sink)  # the sink first: what it got before the store's
        stored = stored_pairs(postgres_db)  # view can only be counted as ambiguous
        ambiguous = {
            pair: copies - counted[pair]
            for pair, copies in received.items()
            if pair not in stored and copies > counted[pair]
        }
        if ambiguous:
            window_kills += 1
            ambiguous_total += sum(ambiguous.values())
            counted.update(ambiguous)
        victim.start()
        assert victim.pid is not None
        by_pid[victim.pid] = victim
        dead = found[0]
        wait_until(
            lambda dead=dead: (h := holder(postgres_db)) is not None and h[0] != dead,
            60,
            "the mailbox is taken over",
        )
        takeovers.append(time.monotonic() - killed_at)

    smtp_sink.delay = {}
    during_kills = len(sink_pairs(smtp_sink))
    wait_until(lambda: expected <= set(sink_pairs(smtp_sink)), 120, "every pair is sent")
    wait_until(
        lambda: all(b"$Forwarded" in flags for _, flags, _ in mailbox.messages()),
        60,
        "every message is marked",
    )
    codes = [instance.signal(signal.SIGTERM) for instance in two_instances]
    received = sink_pairs(smtp_sink)
    duplicates = sum(received.values()) - len(received)
    print(
        f"\ntwo instances: {kills} SIGKILLs of the lease holder, {window_kills} landed between "
        f"a DATA and its recorded reply ({ambiguous_total} ambiguous pairs); "
        f"{len(expected)} pairs expected, {during_kills} sent while killing, "
        f"{len(set(received) & expected)} received in all, "
        f"{duplicates} duplicates; takeover after a kill "
        f"{min(takeovers):.1f}-{max(takeovers):.1f} s (lease {TAKEOVER_AFTER} s)"
    )
    assert codes == [0, 0]
    assert expected == set(received)  # nothing lost, RCPT TO only from configured members
    assert duplicates <= ambiguous_total
    assert kills >= 5


@pytest.mark.parametrize("two_instances", [STEADY_TAKEOVER_AFTER], indirect=True)
def test_the_instance_without_the_lease_sends_nothing(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    postgres_db: PostgresDatabase,
    two_instances: tuple[Instance, Instance],
) -> None:
    expected = fill(mailbox, 60, "one-holder")
    for instance in two_instances:
        instance.start()
    wait_until(lambda: expected <= set(sink_pairs(smtp_sink)), 120, "every pair is sent")
    wait_until(
        lambda: all(b"$Forwarded" in flags for _, flags, _ in mailbox.messages()),
        60,
        "every message is marked",
    )
    assert [instance.signal(signal.SIGTERM) for instance in two_instances] == [0, 0]
    sent = {
        instance.name: sum(
            int(str(e.get("delivered", 0)))
            for e in instance.events()
            if e["event"] == "cycle_finished"
        )
        for instance in two_instances
    }
    waited = [
        instance.name
        for instance in two_instances
        if any(e["event"] == "mailbox_held_elsewhere" for e in instance.events())
    ]
    assert sorted(sent.values()) == [0, len(expected)]
    assert waited == [name for name, count in sent.items() if count == 0]


async def test_leases_are_trusted_until_they_end_while_the_store_is_unreachable(
    postgres_db: PostgresDatabase,
) -> None:
    store = PgStateStore(postgres_db.url)
    leases = MailboxLeases(store, "one", ["box"], ttl=0.5)
    try:
        assert await leases.beat() == {"box"}
        await asyncio.to_thread(postgres_db.cluster.stop)
        trusted_until = time.monotonic() + 0.5  # at the latest
        await leases.beat()
        still = leases.holds("box") or time.monotonic() >= trusted_until
        await asyncio.sleep(max(0.0, trusted_until - time.monotonic()))
        await leases.beat()
        assert still and not leases.holds("box")
        await asyncio.to_thread(postgres_db.cluster.start)
        assert await leases.beat() == {"box"}
    finally:
        store.close()


def held_now(instance: Instance) -> set[str]:
    """The mailboxes the instance said it holds, in its last `mailboxes_acquired`."""
    found = [e for e in instance.events() if e["event"] == "mailboxes_acquired"]
    return set(found[-1]["held"]) if found else set()  # type: ignore[call-overload]


@pytest.mark.parametrize("two_instances", [15.0], indirect=True)  # a beat every 5 s
def test_a_second_instance_takes_half_of_the_mailboxes_and_works_them(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    two_instances: tuple[Instance, Instance],
    tmp_path: Path,
) -> None:
    boxes = [f"box{n}" for n in range(4)]
    toml = tmp_path / "mailboxes.toml"
    toml.write_text(
        "".join(
            f'[[mailbox]]\nname = "{box}"\nfolder = "{box}"\n'
            f'lists = {{ "{box}@example.org" = ["member-{box}@example.org"] }}\n\n'
            for box in boxes
        )
    )
    with mailbox.imap() as client:
        for box in boxes:
            client.create_folder(box)
        client.logout()
    first, second = two_instances
    for instance in two_instances:
        instance.env = {**instance.env, "FORWARDER_MAILBOXES_FILE": str(toml)}
    first.start()
    wait_until(lambda: held_now(first) == set(boxes), 60, "the first instance holds all")
    second.start()
    wait_until(lambda: len(held_now(first)) == len(held_now(second)) == 2, 60, "two each")
    with mailbox.imap() as client:  # new mail for every mailbox, after the division
        for box in boxes:
            client.append(box, build_message(to=f"{box}@example.org", message_id=f"<{box}@r>"))
        client.logout()
    expected = {(f"{box}@r", f"member-{box}@example.org") for box in boxes}
    wait_until(lambda: set(sink_pairs(smtp_sink)) == expected, 60, "every mailbox forwarded")
    first_held, second_held = held_now(first), held_now(second)
    assert [i.signal(signal.SIGTERM) for i in two_instances] == [0, 0]
    assert first_held | second_held == set(boxes) and not first_held & second_held
    assert sum(sink_pairs(smtp_sink).values()) == len(expected)
    worked = {
        i.name: {
            e["mailbox"]
            for e in i.events()
            if e["event"] == "cycle_finished" and int(str(e.get("delivered", 0))) > 0
        }
        for i in two_instances
    }
    assert worked == {first.name: first_held, second.name: second_held}


async def test_claims_are_renewed_while_a_send_outlasts_the_lease(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    postgres_db: PostgresDatabase,
    make_settings: MakeSettings,
) -> None:
    """Instance A's send takes longer than the claim's lease; instance B, cycling meanwhile
    on the same mailbox, must not take the claim and send the message a second time."""
    lease = 0.5
    settings = make_settings(state_db="", state_url=postgres_db.url, takeover_after=lease)
    mailbox.deliver(build_message(), ["contact@example.org"])
    stores = [open_store(settings), open_store(settings)]
    a, b = (build_forwarder(settings, settings.mailboxes()[0], store) for store in stores)
    smtp_sink.delay = {"DATA": 4 * lease}
    try:
        sending = asyncio.create_task(a.run_cycle())
        await asyncio.to_thread(smtp_sink.wait_for_command, "DATA", 30)
        await asyncio.sleep(2 * lease)  # the behaviour under test: a claim past its lease
        await b.run_cycle()
        await sending
    finally:
        for forwarder in (a, b):
            await forwarder.close()
        for store in stores:
            store.close()
    assert sorted(rcpt for r in smtp_sink.received for rcpt in r.rcpt_tos) == [
        "alice@example.org",
        "bob@example.org",
    ]
