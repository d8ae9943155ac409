"""SQLite-only behaviour of the state store: what a cycle asks reads only the rows in play.

A catch-all keeps years of mail, so a store keeps a final record for each of its
messages. The questions every cycle (and every start) asks must not read them: the
work is counted in SQLite virtual-machine steps (a progress handler), which do not
depend on the machine or its load, on a store of 100 final messages and on one of
20,000 (the bench measures the time on 100,000).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from forwarder.sqlite_store import SqliteStateStore
from forwarder.state import ClaimRequest, Delivery, MessageResult, Status, UidRecord, UidState

T0 = 1_700_000_000.0
LEASE = 60.0
BOX = "acme"
UIDVALIDITY = 7
LISTS = ("contact@example.org",)
MEMBERS = ("a@example.org", "b@example.org")
SMALL, LARGE = 100, 20_000


def request_for(key: str) -> ClaimRequest:
    return ClaimRequest(key, None, "sender@remote.example", LISTS, tuple((m, m) for m in MEMBERS))


def delivered(key: str) -> MessageResult:
    return MessageResult(
        key, None, LISTS, tuple(Delivery(m, m, Status.DELIVERED, 250, "2.0.0 ok") for m in MEMBERS)
    )


def deferred(key: str) -> MessageResult:
    return MessageResult(
        key,
        None,
        LISTS,
        tuple(Delivery(m, m, Status.DEFERRED, 451, "4.2.0 busy", T0 + 3600) for m in MEMBERS),
    )


def build(path: Path, final: int) -> None:
    """`final` forwarded messages (a third skipped instead), one in a hundred of them still
    deferred (a long-lived store has some), and the same few rows in play: two open UIDs,
    one final UID not marked yet, one claimed message."""
    store = SqliteStateStore(path)
    try:
        done = [u for u in range(1, final + 1) if u % 3]
        skipped = [u for u in range(1, final + 1) if not u % 3]
        keys = [f"key-{u}" for u in done]
        store.claim(BOX, [request_for(k) for k in keys], "old", T0, LEASE)
        store.record_results(
            BOX,
            [deferred(k) if not u % 100 else delivered(k) for u, k in zip(done, keys, strict=True)],
            T0 + 1,
        )
        records = [UidRecord(u, UidState.DONE, keys[i]) for i, u in enumerate(done)]
        records += [UidRecord(u, UidState.SKIPPED, reason="no list") for u in skipped]
        store.record_uids(BOX, UIDVALIDITY, records, T0 + 1, watermark=final, marked=done)
        top = final
        store.record_uids(
            BOX,
            UIDVALIDITY,
            [
                UidRecord(top + 1, UidState.OPEN),
                UidRecord(top + 2, UidState.OPEN),
                UidRecord(top + 3, UidState.DONE, "key-new"),
            ],
            T0 + 2,
            watermark=top + 3,
        )
        store.claim(BOX, [request_for("key-claimed")], "old", T0 + 2, LEASE)
    finally:
        store.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The two stores, built once; each test opens a copy."""
    base = tmp_path_factory.mktemp("stores")
    paths = {}
    for final in (SMALL, LARGE):
        paths[final] = base / f"store-{final}.db"
        build(paths[final], final)
    return paths


@pytest.fixture
def copies(stores: dict[int, Path], tmp_path: Path) -> dict[int, Path]:
    """Copies of both stores: a test may change them."""
    found = {}
    for final, path in stores.items():
        found[final] = tmp_path / path.name
        found[final].write_bytes(path.read_bytes())
    return found


@pytest.fixture
def opened(copies: dict[int, Path]) -> Iterator[dict[int, SqliteStateStore]]:
    found = {final: SqliteStateStore(path) for final, path in copies.items()}
    try:
        yield found
    finally:
        for store in found.values():
            store.close()


class Steps:
    """Counts the virtual-machine steps of one SQLite connection."""

    def __init__(self) -> None:
        self.count = 0

    def tick(self) -> int:
        self.count += 1
        return 0  # go on

    def watch(self, db: sqlite3.Connection) -> None:
        db.set_progress_handler(self.tick, 1)


def steps(store: SqliteStateStore, call: Callable[[SqliteStateStore], Any]) -> int:
    counter = Steps()
    counter.watch(store._db)
    try:
        call(store)
    finally:
        store._db.set_progress_handler(None, 1)
    return counter.count


def same_work(small: int, large: int) -> bool:
    """Within a few steps: a B-tree one level deeper is still one step to search."""
    return large <= small * 1.1 + 20


def test_open_uids_read_only_the_open_records(opened: dict[int, SqliteStateStore]) -> None:
    small, large = (
        steps(opened[n], lambda s: s.open_uids(BOX, UIDVALIDITY, T0 + 10)) for n in (SMALL, LARGE)
    )
    assert opened[LARGE].open_uids(BOX, UIDVALIDITY, T0 + 10) == [LARGE + 1, LARGE + 2]
    assert same_work(small, large), (small, large)


def test_unmarked_uids_read_only_the_unmarked_records(
    opened: dict[int, SqliteStateStore],
) -> None:
    small, large = (
        steps(opened[n], lambda s: s.unmarked_uids(BOX, UIDVALIDITY)) for n in (SMALL, LARGE)
    )
    assert [r.uid for r in opened[LARGE].unmarked_uids(BOX, UIDVALIDITY)] == [LARGE + 3]
    assert same_work(small, large), (small, large)


def test_renewing_claims_reads_only_the_claimed_deliveries(
    opened: dict[int, SqliteStateStore],
) -> None:
    small, large = (
        steps(opened[n], lambda s: s.renew("old", T0 + 3, LEASE)) for n in (SMALL, LARGE)
    )
    assert same_work(small, large), (small, large)


def test_opening_the_store_reads_only_the_claimed_deliveries(
    copies: dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At open, the claims of a process that is gone are expired."""
    counters: list[Steps] = []
    connect = sqlite3.connect

    def counted(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        db = connect(*args, **kwargs)
        counters.append(Steps())
        counters[-1].watch(db)
        return db

    monkeypatch.setattr(sqlite3, "connect", counted)
    for final in (SMALL, LARGE):
        SqliteStateStore(copies[final]).close()
    small, large = (c.count for c in counters)
    assert same_work(small, large), (small, large)
