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

from forwarder import sqlite_claims, sqlite_folders, sqlite_ops, sqlite_schema
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
    MessageResult,
    Requeued,
    StoreReport,
    UidRecord,
    UidState,
)

# The claims in play, in words the deliveries_due partial index answers (SQLite uses a
# partial index only when the query repeats its WHERE): never a scan of every delivery.
# The claims in flight, through their partial index `deliveries_claimed`.
_PENDING = "status = 'pending'"


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
        with self._transaction() as db:
            return sqlite_claims.claim(db, mailbox, requests, owner, now, lease)

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
            sqlite_claims.record_results(db, mailbox, results, now)

    # Folder progress --------------------------------------------------------------

    def folder(self, mailbox: str, uidvalidity: int) -> FolderState | None:
        with self._reading() as db:
            return sqlite_folders.folder(db, mailbox, uidvalidity)

    def last_folder(self, mailbox: str) -> FolderState | None:
        with self._reading() as db:
            return sqlite_folders.last_folder(db, mailbox)

    def open_uids(self, mailbox: str, uidvalidity: int, now: float) -> list[int]:
        with self._reading() as db:
            return sqlite_folders.open_uids(db, mailbox, uidvalidity, now)

    def unmarked_uids(self, mailbox: str, uidvalidity: int) -> list[UidRecord]:
        with self._reading() as db:
            return sqlite_folders.unmarked_uids(db, mailbox, uidvalidity)

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
            sqlite_folders.record_uids(
                db, mailbox, uidvalidity, records, now, watermark, complete_through, marked
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
