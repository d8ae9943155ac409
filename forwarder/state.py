"""The state store: what was delivered to whom, what was skipped, how cycles went.

`StateStore` is the narrow interface the poll cycle uses; `SqliteStateStore`
is the embedded default (WAL, synchronous=FULL: a result is on disk when
`record_deliveries` returns). A PostgreSQL backend can implement the same protocol.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol, TextIO

from forwarder.errors import StateError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deliveries (
    message_key TEXT NOT NULL,
    member TEXT NOT NULL,
    address TEXT NOT NULL,
    status TEXT NOT NULL,
    code INTEGER,
    reply TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    first_try REAL NOT NULL,
    next_try REAL,
    updated REAL NOT NULL,
    lists TEXT NOT NULL,
    message_id TEXT,
    PRIMARY KEY (message_key, member)
) WITHOUT ROWID;
-- Only rows still in play are indexed by state: a delivered row never enters this
-- index, so a store of millions of old deliveries costs nothing per new message.
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (next_try)
    WHERE status IN ('pending', 'deferred');
CREATE INDEX IF NOT EXISTS deliveries_updated ON deliveries (updated);
CREATE TABLE IF NOT EXISTS skipped (
    mailbox TEXT NOT NULL,
    uid INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    reason TEXT NOT NULL,
    message_id TEXT,
    seen REAL NOT NULL,
    PRIMARY KEY (mailbox, uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cycles (
    id INTEGER PRIMARY KEY,
    started REAL NOT NULL,
    finished REAL NOT NULL,
    outcome TEXT NOT NULL,
    messages INTEGER NOT NULL,
    forwarded INTEGER NOT NULL,
    delivered INTEGER NOT NULL,
    deferred INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    skipped INTEGER NOT NULL,
    error TEXT
);
"""


class Status(StrEnum):
    PENDING = "pending"  # about to be sent; still pending after a crash = outcome unknown
    DELIVERED = "delivered"  # the server answered 250 after DATA
    DEFERRED = "deferred"  # 4xx: tried again later, until the retry deadline
    FAILED = "failed"  # 5xx, or deferred past the deadline: final

    @property
    def final(self) -> bool:
        return self in (Status.DELIVERED, Status.FAILED)


@dataclass(frozen=True)
class Delivery:
    """The outcome of one (message, member) delivery attempt."""

    member: str  # normalised member address (the key)
    address: str  # the address given in RCPT TO
    status: Status
    code: int | None = None
    reply: str = ""
    next_try: float | None = None


@dataclass(frozen=True)
class MessageResult:
    """Every delivery of one SMTP transaction, committed together."""

    message_key: str
    message_id: str | None
    lists: tuple[str, ...]
    deliveries: tuple[Delivery, ...]


@dataclass(frozen=True)
class MemberState:
    status: Status
    attempts: int
    first_try: float
    next_try: float | None


@dataclass(frozen=True)
class Skipped:
    mailbox: str
    fingerprint: str
    uid: int
    reason: str
    message_id: str | None


@dataclass(frozen=True)
class CycleRecord:
    started: float
    finished: float
    outcome: str
    messages: int = 0
    forwarded: int = 0
    delivered: int = 0
    deferred: int = 0
    failed: int = 0
    skipped: int = 0
    error: str | None = None


class StateStore(Protocol):
    """What the poll cycle needs from a state store. Every write is durable on return."""

    def member_states(self, keys: Sequence[str]) -> dict[str, dict[str, MemberState]]: ...

    def record_pending(self, results: Sequence[MessageResult]) -> None: ...

    def record_results(self, results: Sequence[MessageResult]) -> None: ...

    def skipped_uids(self, mailbox: str, fingerprint: str) -> set[int]: ...

    def record_skipped(self, items: Sequence[Skipped]) -> None: ...

    def record_cycle(self, cycle: CycleRecord) -> None: ...

    def prune(self, before: float) -> int: ...

    def close(self) -> None: ...


class SqliteStateStore:
    """SQLite state file. Every write is one committed transaction.

    Safe to call from the event loop and from worker threads: one lock serialises
    the connection, and `record_results` is meant to run in a thread (its fsync
    then overlaps with network I/O).
    """

    def __init__(self, path: Path, *, exclusive: bool = True) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._lockfile: TextIO | None = None
        if not path.parent.is_dir():
            raise StateError(
                f"state store {path}: directory {path.parent} does not exist; create it or "
                "set FORWARDER_STATE_DB"
            )
        if exclusive:
            self._take_lock()
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout = 10000")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA cache_size = -8192")  # KiB: hot B-tree pages stay cached
            self._db.executescript(_SCHEMA)  # idempotent; executescript commits itself
            with self._transaction() as db:
                db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                    (str(SCHEMA_VERSION),),
                )
        except sqlite3.Error as exc:
            raise StateError(
                f"state store {path}: cannot open ({exc}); check the path, "
                "permissions and free space"
            ) from None

    def _take_lock(self) -> None:
        """One forwarder process per state file: two would send the same messages."""
        lockpath = self.path.with_name(self.path.name + ".lock")
        try:
            lockfile = open(lockpath, "a+")  # noqa: SIM115 (held for the store's lifetime)
        except OSError as exc:
            raise StateError(
                f"state store {self.path}: cannot create {lockpath} "
                f"({exc.strerror}); check permissions"
            ) from None
        try:
            fcntl.flock(lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lockfile.seek(0)
            owner = lockfile.read().strip() or "unknown"
            lockfile.close()
            raise StateError(
                f"state store {self.path} is in use by another forwarder process (pid {owner}); "
                "run one instance per FORWARDER_STATE_DB"
            ) from None
        lockfile.truncate(0)
        lockfile.write(str(os.getpid()))
        lockfile.flush()
        self._lockfile = lockfile

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                finally:
                    if self._db.in_transaction:
                        with suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise StateError(
                    f"state store {self.path}: write failed ({exc}); nothing is sent "
                    "until it can be written again (check free space)"
                ) from None

    def member_states(self, keys: Sequence[str]) -> dict[str, dict[str, MemberState]]:
        found: dict[str, dict[str, MemberState]] = {key: {} for key in keys}
        unique = list(found)
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            with self._lock:
                rows = self._db.execute(
                    "SELECT message_key, member, status, attempts, first_try, next_try "
                    f"FROM deliveries WHERE message_key IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
            for key, member, status, attempts, first_try, next_try in rows:
                found[key][member] = MemberState(Status(status), attempts, first_try, next_try)
        return found

    def record_pending(self, results: Sequence[MessageResult]) -> None:
        """Deliveries about to be attempted: new rows, or deferred ones now retried."""
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO deliveries (message_key, member, address, status, attempts, "
                "first_try, updated, lists, message_id) VALUES (?, ?, ?, 'pending', 0, ?, ?, ?, ?) "
                "ON CONFLICT (message_key, member) DO UPDATE SET status = 'pending', "
                "updated = excluded.updated WHERE status = 'deferred'",
                [
                    (r.message_key, d.member, d.address, now, now, ",".join(r.lists), r.message_id)
                    for r in results
                    for d in r.deliveries
                ],
            )

    def record_results(self, results: Sequence[MessageResult]) -> None:
        """The servers' replies, in one transaction (a group commit)."""
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO deliveries (message_key, member, address, status, code, reply, "
                "attempts, first_try, next_try, updated, lists, message_id) "
                "VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?) "
                "ON CONFLICT (message_key, member) DO UPDATE SET status = excluded.status, "
                "code = excluded.code, reply = excluded.reply, attempts = attempts + 1, "
                "next_try = excluded.next_try, updated = excluded.updated",
                [
                    (
                        r.message_key,
                        d.member,
                        d.address,
                        d.status.value,
                        d.code,
                        d.reply[:1000],
                        now,
                        d.next_try,
                        now,
                        ",".join(r.lists),
                        r.message_id,
                    )
                    for r in results
                    for d in r.deliveries
                ],
            )

    def skipped_uids(self, mailbox: str, fingerprint: str) -> set[int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT uid FROM skipped WHERE mailbox = ? AND fingerprint = ?",
                (mailbox, fingerprint),
            ).fetchall()
        return {uid for (uid,) in rows}

    def record_skipped(self, items: Sequence[Skipped]) -> None:
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO skipped (mailbox, uid, fingerprint, reason, message_id, "
                "seen) VALUES (?, ?, ?, ?, ?, ?)",
                [(i.mailbox, i.uid, i.fingerprint, i.reason, i.message_id, now) for i in items],
            )

    def prune(self, before: float) -> int:
        """Forget final deliveries and skipped messages last touched before `before`."""
        with self._transaction() as db:
            count = db.execute(
                "DELETE FROM deliveries WHERE updated < ? AND status IN ('delivered', 'failed')",
                (before,),
            ).rowcount
            db.execute("DELETE FROM skipped WHERE seen < ?", (before,))
        return count

    def record_cycle(self, cycle: CycleRecord) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO cycles (started, finished, outcome, messages, forwarded, delivered, "
                "deferred, failed, skipped, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    cycle.started,
                    cycle.finished,
                    cycle.outcome,
                    cycle.messages,
                    cycle.forwarded,
                    cycle.delivered,
                    cycle.deferred,
                    cycle.failed,
                    cycle.skipped,
                    cycle.error,
                ),
            )
            db.execute("DELETE FROM cycles WHERE id <= (SELECT MAX(id) - 1000 FROM cycles)")

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self._lockfile is not None:
            self._lockfile.close()  # releases the lock
            self._lockfile = None
