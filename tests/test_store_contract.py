"""The state store contract (forwarder/state.py), run against every backend.

Each test uses explicit times: a store records what the caller tells it and never
its own clock (leases aside, which a backend may judge by its own clock).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from forwarder.sqlite_store import SqliteStateStore
from forwarder.state import (
    ClaimRequest,
    CycleRecord,
    Delivery,
    MessageResult,
    StateStore,
    Status,
    UidRecord,
    UidState,
)

T0 = 1_700_000_000.0
LEASE = 60.0
BOX = "acme"
LISTS = ("contact@example.org",)


@pytest.fixture(params=["sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    backend = SqliteStateStore(tmp_path / "state.db")
    try:
        yield backend
    finally:
        backend.close()


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
    store.claim(BOX, [request_for("k", "a@x.org")], "one", T0, LEASE)
    [claim] = store.claim(BOX, [request_for("k", "a@x.org")], "two", T0 + LEASE + 1, LEASE)
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
    store.claim(BOX, [request_for("k", "a@x.org")], "one", T0, LEASE)
    store.claim(BOX, [request_for("j", "a@x.org")], "two", T0, LEASE)
    store.renew("one", T0 + LEASE - 1, LEASE)
    after = T0 + LEASE + 1
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
