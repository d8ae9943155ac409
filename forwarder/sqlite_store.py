"""The embedded state store: one SQLite file (WAL, synchronous=FULL: a result is on disk
when the call returns), used by one process at a time (an flock on the real file).

Claims need no coordination here: the lock guarantees a single writer, so every
`pending` row found at open belongs to a process that is gone and its claim is
expired at once. The contract is in `forwarder.state`.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TextIO

from forwarder import sqlite_ops, sqlite_schema
from forwarder.errors import StateError, StoreBusy
from forwarder.mailbox import DEFAULT_MAILBOX
from forwarder.sqlite_report import read_report
from forwarder.state import (
    CYCLES_KEPT,
    Claim,
    ClaimRequest,
    CycleRecord,
    DeliveryQuery,
    DeliveryRow,
    FolderState,
    MemberState,
    MessageResult,
    Requeued,
    Status,
    StoreReport,
    UidRecord,
    UidState,
)

_CHUNK = 500  # host parameters per IN (...) list
# The claims in play, in words the deliveries_due partial index answers (SQLite uses a
# partial index only when the query repeats its WHERE): never a scan of every delivery.
_PENDING = "status IN ('pending', 'deferred') AND status = 'pending'"


class SqliteStateStore:
    """SQLite state file. Every write is one committed transaction.

    Safe to call from the event loop and from worker threads: one lock serialises
    the connection.
    """

    def __init__(self, path: Path, *, exclusive: bool = True, readonly: bool = False) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._lockfile: TextIO | None = None
        if readonly:
            self._db = self._open_readonly()
            return
        if not path.parent.is_dir():
            raise StateError(
                f"state store {path}: directory {path.parent} does not exist",
                advice="create it",
                settings=("FORWARDER_STATE_DB",),
            )
        if exclusive:
            self._take_lock()
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout = 10000")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA cache_size = -8192")  # KiB: hot B-tree pages stay cached
            # After a checkpoint the WAL is cut back to 1 MiB: a small disk keeps its space.
            self._db.execute("PRAGMA journal_size_limit = 1048576")
            with self._transaction() as db:
                sqlite_schema.migrate(db, DEFAULT_MAILBOX)
                if exclusive:  # we are the only writer: every claim left is a dead one's
                    db.execute(
                        f"UPDATE deliveries SET claim_until = 0 WHERE {_PENDING} "
                        "AND claim_until IS NOT 0"
                    )
        except sqlite3.Error as exc:
            self._release_lock()
            raise StateError(
                f"state store {path}: cannot open ({exc})",
                advice="check the path, permissions and free space",
            ) from None
        except StateError:
            self._release_lock()
            raise

    def _open_readonly(self) -> sqlite3.Connection:
        path = self.path
        if not path.is_file():
            raise StateError(
                f"state store {path} does not exist",
                advice="point FORWARDER_STATE_DB at the file the service uses",
            )
        try:
            db = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
            )
            db.execute("PRAGMA busy_timeout = 10000")
            version = sqlite_schema.version(db)
        except sqlite3.Error as exc:
            raise StateError(
                f"state store {path}: cannot read ({exc})",
                advice="is it the forwarder's state file?",
                settings=("FORWARDER_STATE_DB",),
            ) from None
        if version != sqlite_schema.VERSION:
            db.close()
            raise StateError(
                f"state store {path} has schema version {version}, this forwarder reads "
                f"version {sqlite_schema.VERSION}",
                advice="run `forwarder once` or start the service once to upgrade it",
            )
        return db

    def _take_lock(self) -> None:
        """One forwarder process per state file: two would send the same messages.

        The lock file is named from the real path, so that a second process reaching
        the same file through a symbolic link or another relative path still meets it.
        """
        real = self.path.resolve()
        lockpath = real.with_name(real.name + ".lock")
        try:
            lockfile = open(lockpath, "a+")  # noqa: SIM115 (held for the store's lifetime)
        except OSError as exc:
            raise StateError(
                f"state store {self.path}: cannot create {lockpath} ({exc.strerror})",
                advice="check permissions",
            ) from None
        try:
            fcntl.flock(lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lockfile.seek(0)
            owner = lockfile.read().strip() or "unknown"
            lockfile.close()
            raise StoreBusy(
                f"state store {self.path} is in use by another forwarder process (pid {owner})",
                advice="run one instance per state file",
                settings=("FORWARDER_STATE_DB",),
            ) from None
        lockfile.truncate(0)
        lockfile.write(str(os.getpid()))
        lockfile.flush()
        self._lockfile = lockfile

    def _release_lock(self) -> None:
        if self._lockfile is not None:
            self._lockfile.close()  # releases the lock
            self._lockfile = None

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
                    "until it can be written again",
                    advice="check free space and permissions",
                ) from None

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise StateError(
                    f"state store {self.path}: read failed ({exc})",
                    advice="check the file; restore it from a backup if it is damaged",
                ) from None

    # Deliveries -------------------------------------------------------------------

    def claim(
        self,
        mailbox: str,
        requests: Sequence[ClaimRequest],
        owner: str,
        now: float,
        lease: float,
    ) -> list[Claim]:
        keys = list(dict.fromkeys(r.message_key for r in requests))
        until = now + lease
        with self._transaction() as db:
            rows = _member_rows(db, mailbox, keys)
            inserts: list[tuple[object, ...]] = []
            updates: list[tuple[object, ...]] = []
            claims: list[Claim] = []
            for request in requests:
                known = rows.setdefault(request.message_key, {})
                states: dict[str, MemberState] = {}
                won: set[str] = set()
                interrupted: set[str] = set()
                lists = ",".join(request.lists)
                for member, address in request.members:
                    row = known.get(member)
                    if row is None:
                        state = MemberState(Status.PENDING, 0, now, None)
                        inserts.append(
                            (
                                mailbox,
                                request.message_key,
                                member,
                                address,
                                now,
                                now,
                                lists,
                                request.message_id,
                                request.sender,
                                owner,
                                until,
                            )
                        )
                    else:
                        state, claim_until = row
                        if state.status is Status.DEFERRED and (state.next_try or 0) <= now:
                            pass
                        elif state.status is Status.PENDING and (claim_until or 0) < now:
                            interrupted.add(member)
                            state = MemberState(
                                Status.PENDING, state.attempts + 1, state.first_try, None
                            )
                        else:
                            states[member] = state
                            continue
                        state = MemberState(
                            Status.PENDING, state.attempts, state.first_try, state.next_try
                        )
                        updates.append(
                            (
                                state.attempts,
                                now,
                                owner,
                                until,
                                mailbox,
                                request.message_key,
                                member,
                            )
                        )
                    known[member] = (state, until)
                    states[member] = state
                    won.add(member)
                claims.append(Claim(states, frozenset(won), frozenset(interrupted)))
            db.executemany(
                "INSERT INTO deliveries (mailbox, message_key, member, address, status, "
                "attempts, first_try, updated, lists, message_id, sender, claim_owner, "
                "claim_until) VALUES (?, ?, ?, ?, 'pending', 0, ?, ?, ?, ?, ?, ?, ?)",
                inserts,
            )
            db.executemany(
                "UPDATE deliveries SET status = 'pending', attempts = ?, updated = ?, "
                "claim_owner = ?, claim_until = ? "
                "WHERE mailbox = ? AND message_key = ? AND member = ?",
                updates,
            )
        return claims

    def renew(self, owner: str, now: float, lease: float) -> None:
        with self._transaction() as db:
            db.execute(
                f"UPDATE deliveries SET claim_until = ? WHERE {_PENDING} AND claim_owner = ?",
                (now + lease, owner),
            )

    def release(self, mailbox: str, keys: Sequence[tuple[str, str]], owner: str) -> None:
        """Give back claims never used: the deliveries are due again at once."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE deliveries SET status = 'deferred', next_try = NULL, claim_owner = NULL, "
                "claim_until = NULL WHERE mailbox = ? AND message_key = ? AND member = ? "
                "AND status = 'pending' AND claim_owner = ?",
                [(mailbox, key, member, owner) for key, member in keys],
            )

    def record_results(self, mailbox: str, results: Sequence[MessageResult], now: float) -> None:
        """The servers' replies, in one transaction (a group commit). Idempotent."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE deliveries SET status = ?, code = ?, reply = ?, attempts = attempts + 1, "
                "next_try = ?, updated = ?, claim_owner = NULL, claim_until = NULL "
                "WHERE mailbox = ? AND message_key = ? AND member = ? AND status = 'pending'",
                [
                    (
                        d.status.value,
                        d.code,
                        d.reply[:1000],
                        d.next_try,
                        now,
                        mailbox,
                        r.message_key,
                        d.member,
                    )
                    for r in results
                    for d in r.deliveries
                ],
            )

    # Folder progress --------------------------------------------------------------

    def folder(self, mailbox: str, uidvalidity: int) -> FolderState | None:
        with self._reading() as db:
            row = db.execute(
                "SELECT uidvalidity, watermark, complete_through FROM folders "
                "WHERE mailbox = ? AND uidvalidity = ?",
                (mailbox, uidvalidity),
            ).fetchone()
        return FolderState(*row) if row else None

    def last_folder(self, mailbox: str) -> FolderState | None:
        with self._reading() as db:
            row = db.execute(
                "SELECT uidvalidity, watermark, complete_through FROM folders "
                "WHERE mailbox = ? ORDER BY updated DESC LIMIT 1",
                (mailbox,),
            ).fetchone()
        return FolderState(*row) if row else None

    def open_uids(self, mailbox: str, uidvalidity: int, now: float) -> list[int]:
        # INDEXED BY here and in unmarked_uids: without statistics SQLite prefers the
        # primary key, which has the same two leading columns, to a partial index, and
        # would read every record of the folder at every cycle.
        with self._reading() as db:
            rows = db.execute(
                "SELECT uid FROM uids INDEXED BY uids_open WHERE mailbox = ? AND uidvalidity = ? "
                "AND state = 'open' AND (due IS NULL OR due <= ?) ORDER BY uid",
                (mailbox, uidvalidity, now),
            ).fetchall()
        return [uid for (uid,) in rows]

    def unmarked_uids(self, mailbox: str, uidvalidity: int) -> list[UidRecord]:
        """Final messages whose keywords were never confirmed set."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT uid, state FROM uids INDEXED BY uids_unmarked WHERE mailbox = ? "
                "AND uidvalidity = ? AND marked = 0 AND state IN ('done', 'failed', 'quarantined') "
                "ORDER BY uid",
                (mailbox, uidvalidity),
            ).fetchall()
        return [UidRecord(uid, UidState(state)) for uid, state in rows]

    def record_uids(
        self,
        mailbox: str,
        uidvalidity: int,
        records: Sequence[UidRecord],
        now: float,
        *,
        watermark: int | None = None,
        complete_through: float | None = None,
        marked: Sequence[int] = (),
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO folders (mailbox, uidvalidity, watermark, complete_through, created, "
                "updated) VALUES (?, ?, 0, NULL, ?, ?) ON CONFLICT DO UPDATE SET updated = ?",
                (mailbox, uidvalidity, now, now, now),
            )
            if watermark is not None:
                db.execute(
                    "UPDATE folders SET watermark = MAX(watermark, ?) "
                    "WHERE mailbox = ? AND uidvalidity = ?",
                    (watermark, mailbox, uidvalidity),
                )
            if complete_through is not None:
                db.execute(
                    "UPDATE folders SET complete_through = ? WHERE mailbox = ? AND uidvalidity = ?",
                    (complete_through, mailbox, uidvalidity),
                )
            db.executemany(
                "INSERT OR REPLACE INTO uids (mailbox, uidvalidity, uid, state, message_key, "
                "message_id, reason, due, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        mailbox,
                        uidvalidity,
                        r.uid,
                        r.state.value,
                        r.message_key,
                        r.message_id,
                        r.reason,
                        r.due,
                        now,
                    )
                    for r in records
                ],
            )
            db.executemany(
                "UPDATE uids SET marked = 1 WHERE mailbox = ? AND uidvalidity = ? AND uid = ?",
                [(mailbox, uidvalidity, uid) for uid in marked],
            )

    # Mailbox leases ----------------------------------------------------------------

    def acquire_mailboxes(
        self, owner: str, names: Sequence[str], now: float, ttl: float
    ) -> set[str]:
        """Every mailbox: the file lock already makes this process the only one."""
        return set(names)

    def release_mailboxes(self, owner: str) -> None:
        """Nothing to give back: no other process can use this file meanwhile."""

    # Reporting ----------------------------------------------------------------------

    def record_cycle(self, mailbox: str, cycle: CycleRecord) -> None:
        c = cycle
        with self._transaction() as db:
            db.execute(
                "INSERT INTO cycles (mailbox, started, finished, outcome, messages, forwarded, "
                "delivered, deferred, failed, skipped, quarantined, error) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    mailbox,
                    c.started,
                    c.finished,
                    c.outcome,
                    c.messages,
                    c.forwarded,
                    c.delivered,
                    c.deferred,
                    c.failed,
                    c.skipped,
                    c.quarantined,
                    c.error,
                ),
            )
            db.execute(  # the last CYCLES_KEPT of each mailbox
                "DELETE FROM cycles WHERE mailbox = ? AND id <= (SELECT MAX(id) FROM cycles "
                "WHERE mailbox = ?) - ?",
                (mailbox, mailbox, CYCLES_KEPT),
            )

    def prune(self, before: float) -> int:
        """Forget deliveries and message records last touched before `before` (open ones and
        live claims excepted). The folder watermark keeps old messages from being re-read."""
        with self._transaction() as db:
            count = db.execute(
                "DELETE FROM deliveries WHERE updated < ? AND status != 'pending'", (before,)
            ).rowcount
            db.execute(
                "DELETE FROM uids WHERE updated < ? AND state NOT IN (?, ?)",
                (before, UidState.OPEN.value, UidState.QUARANTINED.value),
            )
        return count

    def report(self, mailbox: str | None, failed_limit: int) -> StoreReport:
        with self._reading() as db:
            return read_report(db, mailbox, failed_limit)

    # Operator commands (forwarder.sqlite_ops) -------------------------------------------

    def deliveries(
        self, mailbox: str | None, query: DeliveryQuery, limit: int | None = None
    ) -> list[DeliveryRow]:
        with self._reading() as db:
            return sqlite_ops.deliveries(db, mailbox, query, limit)

    def uid_records(
        self,
        mailbox: str,
        uidvalidity: int,
        *,
        uids: Sequence[int] = (),
        message_keys: Sequence[str] = (),
        message_id: str | None = None,
    ) -> list[UidRecord]:
        with self._reading() as db:
            return sqlite_ops.uid_records(db, mailbox, uidvalidity, uids, message_keys, message_id)

    def requeue(
        self,
        mailbox: str,
        uidvalidity: int,
        deliveries: Sequence[tuple[str, str]],
        uids: Sequence[int],
        now: float,
    ) -> Requeued:
        with self._transaction() as db:
            return sqlite_ops.requeue(db, mailbox, uidvalidity, deliveries, uids, now)

    def deferred_counts(self) -> dict[str, int]:
        with self._reading() as db:
            rows = db.execute(
                # only the rows in play, through their partial index (the planner would
                # rather scan the whole table to group by mailbox)
                "SELECT mailbox, COUNT(*) FROM deliveries INDEXED BY deliveries_due "
                "WHERE status IN ('pending', 'deferred') AND status = 'deferred' "
                "GROUP BY mailbox"
            ).fetchall()
        return {mailbox: count for mailbox, count in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._release_lock()


def _member_rows(
    db: sqlite3.Connection, mailbox: str, keys: Sequence[str]
) -> dict[str, dict[str, tuple[MemberState, float | None]]]:
    found: dict[str, dict[str, tuple[MemberState, float | None]]] = {}
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start : start + _CHUNK]
        for key, member, status, attempts, first_try, next_try, claim_until in db.execute(
            "SELECT message_key, member, status, attempts, first_try, next_try, claim_until "
            f"FROM deliveries WHERE mailbox = ? AND message_key IN ({','.join('?' * len(chunk))})",
            [mailbox, *chunk],
        ):
            state = MemberState(Status(status), attempts, first_try, next_try)
            found.setdefault(key, {})[member] = (state, claim_until)
    return found
