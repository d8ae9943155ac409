"""The state store contract (forwarder/state.py), run against every backend.

Each test uses explicit times: a store records what the caller tells it and never
its own clock (leases aside, which a backend may judge by its own clock). A test
where a lease ends takes a SHORT one and calls `expire(store, SHORT)`: nothing to wait
for on SQLite (the caller's `now` decides), a real wait of SHORT on PostgreSQL
(the database clock decides).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forwarder.pg_store import PgStateStore
from forwarder.sqlite_store import SqliteStateStore
from forwarder.state import (
    ClaimRequest,
    CycleRecord,
    Delivery,
    DeliveryQuery,
    MessageResult,
    StateStore,
    Status,
    UidRecord,
    UidState,
)

T0 = 1_700_000_000.0
LEASE = 60.0
SHORT = 0.2  # a lease that ends during the test (a real wait on PostgreSQL)
BOX = "acme"
LISTS = ("contact@example.org",)


def open_backend(request: pytest.FixtureRequest, tmp_path: Path) -> StateStore:
    if request.param == "postgres":
        return PgStateStore(request.getfixturevalue("postgres_db").url)
    return SqliteStateStore(tmp_path / "state.db")


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    backend = open_backend(request, tmp_path)
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture(params=["postgres"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    """A store several instances share (a SQLite file is one process's, by its lock)."""
    backend = open_backend(request, tmp_path)
    try:
        yield backend
    finally:
        backend.close()


def expire(store: StateStore, seconds: float) -> None:
    """Let a lease of `seconds` end: real time passes only where the store's clock decides."""
    if isinstance(store, PgStateStore):
        time.sleep(seconds)


def request_for(key: str, *members: str, message_id: str | None = None) -> ClaimRequest:
    return ClaimRequest(
        key, message_id, "sender@remote.example", LISTS, tuple((m, m) for m in members)
    )


def result(key: str, *deliveries: Delivery) -> MessageResult:
    return MessageResult(key, None, LISTS, deliveries)


def ok(member: str) -> Delivery:
    return Delivery(member, member, Status.DELIVERED, 250, "2.0.0 queued")


def later(member: str, next_try: float) -> Delivery:
    return Delivery(member, member, Status.DEFERRED, 451, "4.2.0 busy", next_try)


def refused(member: str) -> Delivery:
    return Delivery(member, member, Status.FAILED, 550, "5.1.1 unknown")


def test_new_members_are_won_by_the_first_claim(store: StateStore) -> None:
    [claim] = store.claim(BOX, [request_for("k", "a@x.org", "b@x.org")], "one", T0, LEASE)
    assert claim.won == {"a@x.org", "b@x.org"}
    assert claim.states["a@x.org"].status is Status.PENDING
    assert claim.states["a@x.org"].attempts == 0
    assert claim.interrupted == frozenset()


def test_a_live_claim_is_not_won_by_another_owner(store: StateStore) -> None:
    store.claim(BOX, [request_for("k", "a@x.org")], "one", T0, LEASE)
    [claim] = store.claim(BOX, [request_for("k", "a@x.org")], "two", T0 + 1, LEASE)
    assert claim.won == frozenset()
    assert claim.states["a@x.org"].status is Status.PENDING


def test_an_expired_claim_is_won_again_as_an_interrupted_attempt(store: StateStore) -> None:
    store.claim(BOX, [request_for("k", "a@x.org")], "one", T0, SHORT)
    expire(store, SHORT)
    [claim] = store.claim(BOX, [request_for("k", "a@x.org")], "two", T0 + SHORT + 1, LEASE)
    assert claim.won == {"a@x.org"}
    assert claim.interrupted == {"a@x.org"}
    assert claim.states["a@x.org"].attempts == 1  # the attempt cut off counts


def test_a_final_result_is_never_claimed_again(store: StateStore) -> None:
    store.claim(BOX, [request_for("k", "a@x.org", "b@x.org")], "one", T0, LEASE)
    store.record_results(BOX, [result("k", ok("a@x.org"), refused("b@x.org"))], T0 + 1)
    [claim] = store.claim(BOX, [request_for("k", "a@x.org", "b@x.org")], "two", T0 + 999, LEASE)
    assert claim.won == frozenset()
    assert claim.states["a@x.org"].status is Status.DELIVERED
    assert claim.states["b@x.org"].status is Status.FAILED


def test_recording_the_same_results_twice_changes_nothing(store: StateStore) -> None:
    store.claim(BOX, [request_for("k", "a@x.org")], "one", T0, LEASE)
    store.record_results(BOX, [result("k", ok("a@x.org"))], T0 + 1)
    store.record_results(BOX, [result("k", later("a@x.org", T0 + 60))], T0 + 2)
    [claim] = store.claim(BOX, [request_for("k", "a@x.org")], "one", T0 + 999, LEASE)
    assert claim.states["a@x.org"].status is Status.DELIVERED
    assert claim.states["a@x.org"].attempts == 1


def test_a_deferred_member_is_won_only_when_due(store: StateStore) -> None:
    store.claim(BOX, [request_for("k", "a@x.org")], "one", T0, LEASE)
    store.record_results(BOX, [result("k", later("a@x.org", T0 + 600))], T0 + 1)
    [early] = store.claim(BOX, [request_for("k", "a@x.org")], "one", T0 + 599, LEASE)
    [due] = store.claim(BOX, [request_for("k", "a@x.org")], "one", T0 + 600, LEASE)
    assert early.won == frozenset()
    assert early.states["a@x.org"].status is Status.DEFERRED
    assert due.won == {"a@x.org"}
    assert due.states["a@x.org"].attempts == 1
    assert due.states["a@x.org"].first_try == T0


def test_released_claims_are_due_again_at_once_without_an_attempt(store: StateStore) -> None:
    store.claim(BOX, [request_for("k", "a@x.org")], "one", T0, LEASE)
    store.release(BOX, [("k", "a@x.org")], "one")
    [claim] = store.claim(BOX, [request_for("k", "a@x.org")], "two", T0 + 1, LEASE)
    assert claim.won == {"a@x.org"}
    assert claim.interrupted == frozenset()
    assert claim.states["a@x.org"].attempts == 0


def test_release_leaves_another_owners_claim(store: StateStore) -> None:
    store.claim(BOX, [request_for("k", "a@x.org")], "one", T0, LEASE)
    store.release(BOX, [("k", "a@x.org")], "two")
    [claim] = store.claim(BOX, [request_for("k", "a@x.org")], "two", T0 + 1, LEASE)
    assert claim.won == frozenset()


def test_renew_extends_only_the_owners_claims(store: StateStore) -> None:
    store.claim(BOX, [request_for("k", "a@x.org")], "one", T0, SHORT)
    store.claim(BOX, [request_for("j", "a@x.org")], "two", T0, SHORT)
    store.renew("one", T0, LEASE)
    expire(store, SHORT)
    after = T0 + SHORT + 1
    [kept] = store.claim(BOX, [request_for("k", "a@x.org")], "three", after, LEASE)
    [lost] = store.claim(BOX, [request_for("j", "a@x.org")], "three", after, LEASE)
    assert kept.won == frozenset()
    assert lost.won == {"a@x.org"}


def test_mailboxes_deduplicate_separately(store: StateStore) -> None:
    store.claim("one-box", [request_for("k", "a@x.org")], "one", T0, LEASE)
    store.record_results("one-box", [result("k", ok("a@x.org"))], T0 + 1)
    [claim] = store.claim("other-box", [request_for("k", "a@x.org")], "one", T0 + 2, LEASE)
    assert claim.won == {"a@x.org"}


def test_one_member_claimed_for_two_copies_in_one_call_is_won_once(store: StateStore) -> None:
    claims = store.claim(
        BOX, [request_for("k", "a@x.org"), request_for("k", "a@x.org")], "one", T0, LEASE
    )
    assert [c.won for c in claims] == [{"a@x.org"}, frozenset()]


def test_folder_is_unknown_until_recorded(store: StateStore) -> None:
    assert store.folder(BOX, 7) is None
    assert store.last_folder(BOX) is None


def test_watermark_only_moves_up(store: StateStore) -> None:
    store.record_uids(BOX, 7, [UidRecord(5, UidState.DONE)], T0, watermark=5)
    store.record_uids(BOX, 7, [UidRecord(3, UidState.DONE)], T0 + 1, watermark=3)
    folder = store.folder(BOX, 7)
    assert folder is not None and folder.watermark == 5


def test_open_uids_are_returned_when_due(store: StateStore) -> None:
    records = [
        UidRecord(1, UidState.OPEN),
        UidRecord(2, UidState.OPEN, due=T0 + 100),
        UidRecord(3, UidState.DONE),
        UidRecord(4, UidState.SKIPPED, reason="unmatched"),
    ]
    store.record_uids(BOX, 7, records, T0, watermark=4)
    assert store.open_uids(BOX, 7, T0) == [1]
    assert store.open_uids(BOX, 7, T0 + 100) == [1, 2]
    assert store.open_uids(BOX, 8, T0 + 100) == []
    assert store.open_uids("other", 7, T0 + 100) == []


def test_a_later_record_replaces_an_open_one(store: StateStore) -> None:
    store.record_uids(BOX, 7, [UidRecord(1, UidState.OPEN)], T0, watermark=1)
    store.record_uids(BOX, 7, [UidRecord(1, UidState.DONE, "k")], T0 + 1)
    assert store.open_uids(BOX, 7, T0 + 2) == []


def test_complete_through_is_kept_per_folder(store: StateStore) -> None:
    store.record_uids(BOX, 7, [], T0, complete_through=T0 - 5)
    store.record_uids(BOX, 8, [], T0 + 10)
    old = store.folder(BOX, 7)
    last = store.last_folder(BOX)
    assert old is not None and old.complete_through == T0 - 5
    assert last is not None and last.uidvalidity == 8 and last.complete_through is None


def test_prune_forgets_old_final_records_only(store: StateStore) -> None:
    store.claim(BOX, [request_for("k", "a@x.org", "b@x.org", "c@x.org")], "one", T0, LEASE)
    store.record_results(BOX, [result("k", ok("a@x.org"), later("b@x.org", T0 + 60))], T0)
    records = [UidRecord(1, UidState.DONE), UidRecord(2, UidState.OPEN)]
    store.record_uids(BOX, 7, [*records, UidRecord(3, UidState.QUARANTINED)], T0, watermark=3)
    assert store.prune(before=T0 + 1) == 2  # delivered and the stale deferred row
    [claim] = store.claim(BOX, [request_for("k", "a@x.org", "c@x.org")], "two", T0 + 2, LEASE)
    assert claim.won == {"a@x.org"}  # forgotten; c is still claimed by "one"
    assert store.open_uids(BOX, 7, T0 + 2) == [2]
    folder = store.folder(BOX, 7)
    assert folder is not None and folder.watermark == 3


def test_report_counts_deliveries_messages_and_cycles(store: StateStore) -> None:
    store.claim(BOX, [request_for("k", "a@x.org", "b@x.org")], "one", T0, LEASE)
    store.record_results(BOX, [result("k", ok("a@x.org"), refused("b@x.org"))], T0 + 1)
    store.claim(BOX, [request_for("j", "a@x.org")], "one", T0, LEASE)
    store.record_results(BOX, [result("j", later("a@x.org", T0 + 60))], T0 + 1)
    store.record_uids(BOX, 7, [UidRecord(9, UidState.SKIPPED, reason="unmatched")], T0)
    store.record_cycle(BOX, CycleRecord(T0, T0 + 2, "ok", messages=3, quarantined=1))
    report = store.report(BOX, failed_limit=10)
    assert report.deliveries == {"delivered": 1, "failed": 1, "deferred": 1}
    assert report.forwarded_per_list == {"contact@example.org": 1}  # j is still in play
    assert report.skipped == {"unmatched": 1}
    assert [d.member for d in report.deferred] == ["a@x.org"]
    assert [d.member for d in report.failed] == ["b@x.org"]
    assert report.failed[0].sender == "sender@remote.example"
    assert report.last_cycle is not None and report.last_cycle.quarantined == 1
    assert report.cycles == 1
    assert store.report("other", failed_limit=10).deliveries == {}


def test_deferred_counts_are_per_mailbox_and_only_deferred(store: StateStore) -> None:
    store.claim(BOX, [request_for("k", "a@x.org", "b@x.org", "c@x.org")], "one", T0, LEASE)
    store.record_results(
        BOX, [result("k", later("a@x.org", T0 + 60), later("b@x.org", T0 + 60))], T0
    )  # c stays pending (claimed)
    store.claim("other", [request_for("k", "a@x.org", "d@x.org")], "one", T0, LEASE)
    store.record_results("other", [result("k", later("a@x.org", T0 + 60), ok("d@x.org"))], T0)
    store.claim("third", [request_for("j", "a@x.org")], "one", T0, LEASE)
    store.record_results("third", [result("j", refused("a@x.org"))], T0)
    assert store.deferred_counts() == {BOX: 2, "other": 1}


def test_report_shows_at_most_the_failed_limit(store: StateStore) -> None:
    for n in range(5):
        store.claim(BOX, [request_for(f"k{n}", "a@x.org")], "one", T0, LEASE)
        store.record_results(BOX, [result(f"k{n}", refused("a@x.org"))], T0 + n)
    report = store.report(None, failed_limit=3)
    assert len(report.failed) == 3
    assert report.failed_total == 5


def test_final_messages_are_unmarked_until_their_keywords_are_written_down(
    store: StateStore,
) -> None:
    records = [
        UidRecord(1, UidState.DONE),
        UidRecord(2, UidState.FAILED),
        UidRecord(3, UidState.QUARANTINED),
        UidRecord(4, UidState.OPEN),
        UidRecord(5, UidState.SKIPPED),
    ]
    store.record_uids(BOX, 7, records, T0, watermark=5)
    assert [r.uid for r in store.unmarked_uids(BOX, 7)] == [1, 2, 3]
    store.record_uids(BOX, 7, [], T0 + 1, marked=[1, 3])
    assert [(r.uid, r.state) for r in store.unmarked_uids(BOX, 7)] == [(2, UidState.FAILED)]


# Operator commands: deliveries, uid_records, requeue ------------------------------------


def deliver(store: StateStore, key: str, *deliveries: Delivery, when: float = T0) -> None:
    """Claim the members, then record their results at `when`."""
    members = [d.member for d in deliveries]
    store.claim(BOX, [request_for(key, *members, message_id=f"<{key}>")], "one", when, LEASE)
    results = MessageResult(key, f"<{key}>", LISTS, deliveries)
    store.record_results(BOX, [results], when)


def test_deliveries_are_found_by_message_id_member_and_status(store: StateStore) -> None:
    deliver(store, "k", ok("a@x.org"), refused("b@x.org"))
    deliver(store, "j", later("a@x.org", T0 + 60))
    by_id = store.deliveries(BOX, DeliveryQuery(message_id="<k>"))
    by_member = store.deliveries(BOX, DeliveryQuery(member="a@x.org"))
    failed = store.deliveries(BOX, DeliveryQuery(statuses=(Status.FAILED, Status.DEFERRED)))
    assert {(r.message_key, r.member) for r in by_id} == {("k", "a@x.org"), ("k", "b@x.org")}
    assert {r.message_key for r in by_member} == {"k", "j"}
    assert {(r.message_key, r.status) for r in failed} == {
        ("k", Status.FAILED),
        ("j", Status.DEFERRED),
    }


def test_deliveries_carry_what_history_shows(store: StateStore) -> None:
    deliver(store, "k", refused("b@x.org"), when=T0 + 5)
    [row] = store.deliveries(BOX, DeliveryQuery(member="b@x.org"))
    assert (row.mailbox, row.message_id, row.sender) == (BOX, "<k>", "sender@remote.example")
    assert (row.status, row.code, row.reply, row.attempts) == (
        Status.FAILED,
        550,
        "5.1.1 unknown",
        1,
    )
    assert (row.first_try, row.updated, row.lists) == (T0 + 5, T0 + 5, LISTS)


def test_a_list_matches_whole_list_addresses_only(store: StateStore) -> None:
    store.claim(BOX, [request_for("k", "a@x.org")], "one", T0, LEASE)
    other = ClaimRequest("j", None, None, ("act@example.org", "b@y.org"), (("a@x.org", "a@x.org"),))
    store.claim(BOX, [other], "one", T0, LEASE)
    found = store.deliveries(BOX, DeliveryQuery(list_address="contact@example.org"))
    assert [r.message_key for r in found] == ["k"]
    assert [
        r.message_key for r in store.deliveries(BOX, DeliveryQuery(list_address="b@y.org"))
    ] == ["j"]


def test_deliveries_since_keys_mailbox_and_order(store: StateStore) -> None:
    deliver(store, "k", ok("a@x.org"), when=T0)
    deliver(store, "j", ok("a@x.org"), when=T0 + 10)
    deliver(store, "i", ok("a@x.org"), when=T0 + 20)
    store.claim("other", [request_for("k", "a@x.org")], "one", T0 + 30, LEASE)
    since = store.deliveries(BOX, DeliveryQuery(since=T0 + 10))
    assert [r.message_key for r in since] == ["i", "j"]  # most recent first
    keys = store.deliveries(BOX, DeliveryQuery(message_keys=("k", "i")))
    assert [r.message_key for r in keys] == ["i", "k"]
    everywhere = store.deliveries(None, DeliveryQuery(message_keys=("k",)))
    assert {r.mailbox for r in everywhere} == {BOX, "other"}
    assert [r.message_key for r in store.deliveries(BOX, DeliveryQuery(), limit=2)] == ["i", "j"]


def test_uid_records_are_found_by_uid_key_or_message_id(store: StateStore) -> None:
    records = [
        UidRecord(1, UidState.DONE, "k", "<k>"),
        UidRecord(2, UidState.SKIPPED, None, "<s>", "unmatched"),
        UidRecord(3, UidState.OPEN, "j", "<j>", due=T0 + 60),
        UidRecord(4, UidState.DONE, "k", "<k>"),
    ]
    store.record_uids(BOX, 7, records, T0, watermark=4)
    store.record_uids(BOX, 8, [UidRecord(1, UidState.DONE, "k", "<k>")], T0)
    found = store.uid_records(BOX, 7, uids=[3], message_keys=["k"], message_id="<s>")
    assert [(r.uid, r.state) for r in found] == [
        (1, UidState.DONE),
        (2, UidState.SKIPPED),
        (3, UidState.OPEN),
        (4, UidState.DONE),
    ]
    assert found[1].reason == "unmatched" and found[2].due == T0 + 60
    assert {r.updated for r in found} == {T0}
    assert store.uid_records(BOX, 7) == []
    assert store.uid_records("other", 7, uids=[1]) == []


def test_requeue_makes_a_failed_delivery_due_at_once_keeping_its_attempts(
    store: StateStore,
) -> None:
    deliver(store, "k", ok("a@x.org"), refused("b@x.org"))
    store.record_uids(BOX, 7, [UidRecord(1, UidState.FAILED, "k", "<k>")], T0, watermark=1)
    done = store.requeue(BOX, 7, [("k", "b@x.org"), ("k", "a@x.org")], [], T0 + 100)
    assert done.deliveries == (("k", "b@x.org"),)  # a@ was delivered: left alone
    [row] = store.deliveries(BOX, DeliveryQuery(member="b@x.org"))
    assert (row.status, row.attempts, row.next_try) == (Status.DEFERRED, 1, T0 + 100)
    assert (row.code, row.reply) == (550, "5.1.1 unknown")  # the last reply is kept
    [claim] = store.claim(BOX, [request_for("k", "a@x.org", "b@x.org")], "two", T0 + 100, LEASE)
    assert claim.won == {"b@x.org"}
    assert claim.states["b@x.org"].first_try == T0 + 100  # a new retry window


def test_requeue_reopens_the_messages_records_of_that_folder(store: StateStore) -> None:
    deliver(store, "k", refused("b@x.org"))
    store.record_uids(BOX, 7, [UidRecord(1, UidState.FAILED, "k", "<k>")], T0, watermark=1)
    store.record_uids(BOX, 6, [UidRecord(9, UidState.FAILED, "k", "<k>")], T0, watermark=9)
    done = store.requeue(BOX, 7, [("k", "b@x.org")], [], T0 + 100)
    assert [(r.uid, r.state) for r in done.reopened] == [(1, UidState.FAILED)]
    assert store.open_uids(BOX, 7, T0 + 100) == [1]
    assert store.open_uids(BOX, 6, T0 + 100) == []


def test_requeue_reopens_a_skipped_uid_without_deliveries(store: StateStore) -> None:
    skipped = UidRecord(2, UidState.SKIPPED, None, "<s>", "unmatched")
    store.record_uids(BOX, 7, [skipped], T0, watermark=2)
    done = store.requeue(BOX, 7, [], [2, 3], T0 + 100)
    assert done.deliveries == ()
    assert [(r.uid, r.reason) for r in done.reopened] == [(2, "unmatched")]  # 3: no record
    [record] = store.uid_records(BOX, 7, uids=[2])
    assert (record.state, record.reason, record.due) == (UidState.OPEN, None, None)


def test_requeue_leaves_a_pending_delivery_alone(store: StateStore) -> None:
    store.claim(BOX, [request_for("k", "a@x.org")], "one", T0, LEASE)
    done = store.requeue(BOX, 7, [("k", "a@x.org")], [], T0 + 1)
    assert done.deliveries == ()
    [claim] = store.claim(BOX, [request_for("k", "a@x.org")], "two", T0 + 2, LEASE)
    assert claim.won == frozenset()  # still under "one"'s claim


def claim_concurrently(
    store: StateStore, requests: list[ClaimRequest], now: float
) -> list[tuple[str, str]]:
    """Three owners claim overlapping batches of `requests` at once; every pair won."""
    won: list[tuple[str, str]] = []
    start = threading.Barrier(3)

    def claim_all(owner: str) -> None:
        start.wait()
        for first in range(0, len(requests), 7):
            batch = requests[first : first + 14]
            for r, c in zip(batch, store.claim(BOX, batch, owner, now, LEASE), strict=True):
                won.extend((r.message_key, m) for m in c.won)

    threads = [threading.Thread(target=claim_all, args=(f"owner-{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won


def test_concurrent_claims_win_each_new_delivery_once(store: StateStore) -> None:
    members = [f"m{n}@x.org" for n in range(5)]
    requests = [request_for(f"k{n}", *members) for n in range(60)]
    won = claim_concurrently(store, requests, T0)
    assert sorted(won) == sorted((r.message_key, m) for r in requests for m in members)


def test_concurrent_claims_win_each_due_delivery_once(store: StateStore) -> None:
    members = [f"m{n}@x.org" for n in range(5)]
    requests = [request_for(f"k{n}", *members) for n in range(60)]
    store.claim(BOX, requests, "zero", T0, LEASE)
    results = [result(r.message_key, *(later(m, T0 + 1) for m in members)) for r in requests]
    store.record_results(BOX, results, T0)
    won = claim_concurrently(store, requests, T0 + 1)
    assert sorted(won) == sorted((r.message_key, m) for r in requests for m in members)


# Mailbox leases -----------------------------------------------------------------------

NAMES = [f"box-{n}" for n in range(10)]


def test_an_instance_alone_holds_every_mailbox_it_asks_for(store: StateStore) -> None:
    assert store.acquire_mailboxes("one", NAMES, T0, LEASE) == set(NAMES)
    assert store.acquire_mailboxes("one", NAMES[:3], T0 + 1, LEASE) <= set(NAMES[:3])


def test_a_released_instance_holds_nothing_afterwards_until_it_asks_again(
    store: StateStore,
) -> None:
    store.acquire_mailboxes("one", NAMES, T0, LEASE)
    store.release_mailboxes("one")
    assert store.acquire_mailboxes("two", NAMES, T0 + 1, LEASE) == set(NAMES)


def test_two_instances_divide_the_mailboxes_evenly(shared: StateStore) -> None:
    first = shared.acquire_mailboxes("one", NAMES, T0, LEASE)
    joined = shared.acquire_mailboxes("two", NAMES, T0, LEASE)  # one holds all: nothing free
    assert (len(first), joined) == (10, set())
    one = shared.acquire_mailboxes("one", NAMES, T0 + 1, LEASE)  # gives its surplus back
    two = shared.acquire_mailboxes("two", NAMES, T0 + 1, LEASE)
    assert (len(one), len(two)) == (5, 5)
    assert one | two == set(NAMES)


def test_three_instances_hold_disjoint_fair_shares(shared: StateStore) -> None:
    owners = ("one", "two", "three")
    for _ in range(2):
        held = {o: shared.acquire_mailboxes(o, NAMES, T0, LEASE) for o in owners}
    assert sorted(len(h) for h in held.values()) == [2, 4, 4]
    assert set().union(*held.values()) == set(NAMES)


def test_a_live_lease_is_not_taken(shared: StateStore) -> None:
    shared.acquire_mailboxes("one", ["box"], T0, LEASE)
    assert shared.acquire_mailboxes("two", ["box"], T0 + 1, LEASE) == set()
    assert shared.acquire_mailboxes("one", ["box"], T0 + 2, LEASE) == {"box"}


def test_the_mailboxes_of_an_instance_that_stopped_calling_are_taken_over(
    shared: StateStore,
) -> None:
    shared.acquire_mailboxes("dead", NAMES, T0, SHORT)
    shared.acquire_mailboxes("alive", NAMES, T0, SHORT)
    expire(shared, SHORT)
    assert shared.acquire_mailboxes("alive", NAMES, T0 + 1, LEASE) == set(NAMES)


def test_renewed_leases_outlive_the_first_ttl(shared: StateStore) -> None:
    shared.acquire_mailboxes("one", ["box"], T0, SHORT)
    shared.acquire_mailboxes("one", ["box"], T0, LEASE)
    expire(shared, SHORT)
    assert shared.acquire_mailboxes("two", ["box"], T0 + 1, LEASE) == set()


def test_released_mailboxes_are_taken_at_once(shared: StateStore) -> None:
    shared.acquire_mailboxes("one", NAMES, T0, LEASE)
    shared.acquire_mailboxes("two", NAMES, T0, LEASE)
    shared.release_mailboxes("one")
    assert shared.acquire_mailboxes("two", NAMES, T0 + 1, LEASE) == set(NAMES)


def test_cycle_records_are_trimmed_per_mailbox(store: StateStore) -> None:
    """A busy mailbox's records never push out a quiet one's last cycle."""
    from forwarder.state import CYCLES_KEPT

    store.record_cycle("quiet", CycleRecord(T0, T0 + 1, "ok", messages=1))
    for n in range(CYCLES_KEPT + 5):
        store.record_cycle(BOX, CycleRecord(T0 + n, T0 + n + 1, "ok"))
    quiet = store.report("quiet", failed_limit=1)
    assert quiet.last_cycle is not None and quiet.last_cycle.messages == 1
    assert store.report(BOX, failed_limit=1).cycles == CYCLES_KEPT
