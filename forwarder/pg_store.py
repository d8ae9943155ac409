"""The shared state store: PostgreSQL (psycopg 3), for several instances at once.

Selected by FORWARDER_STATE_URL. The contract is in `forwarder.state`; what this
backend adds is real coordination between writers:

* claims are taken with the database's own tools: new deliveries with
  `INSERT ... ON CONFLICT DO NOTHING` (the first instance wins, the others see its
  row), due ones with `SELECT ... FOR UPDATE SKIP LOCKED` (an instance never waits
  for another's claim, it moves on);
* leases (delivery claims and mailbox leases) end by the database clock
  (`clock_timestamp()`), so instances whose clocks differ agree; every other time
  is the caller's `now`;
* the schema is created and migrated by the forwarder (`pg_schema`).

Every call is one transaction on a pooled connection; store calls come from
threads (`asyncio.to_thread`). A lost connection is a StateError naming the server
(never the password); the next call connects again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from forwarder import pg_claims, pg_folders, pg_leases, pg_ops, pg_schema, pg_sql
from forwarder.errors import StateError
from forwarder.pg_connect import Connection, Pool, target, text
from forwarder.pg_report import read_report
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


class PgStateStore:
    """PostgreSQL state store. Thread-safe: each call takes a pooled connection."""

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        ca_file: Path | None = None,
        readonly: bool = False,
        connections: int = 4,
    ) -> None:
        self.target = target(url, password, ca_file)
        self.label = self.target.label
        self.readonly = readonly
        self._pool = Pool(self.target, connections, self._setup)
        try:
            if readonly:
                self._pool.run("reading the schema version", self._check_version)
            else:
                self._pool.run("creating or upgrading the schema", self._migrate)
        except BaseException:
            self._pool.close()
            raise

    def __repr__(self) -> str:
        return f"PgStateStore({self.label!r})"

    def _setup(self, conn: Connection) -> None:
        if self.readonly:  # `forwarder status`: nothing it does can write
            conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")

    def _migrate(self, conn: Connection) -> None:
        try:
            pg_schema.migrate(conn)
        except pg_schema.SchemaError as exc:
            raise StateError(str(exc), server=f"state store {self.label}") from None

    def _check_version(self, conn: Connection) -> None:
        found = pg_schema.version(conn)
        if found == 0:
            raise StateError(
                "holds no forwarder state yet",
                server=f"state store {self.label}",
                advice="start the service (or `forwarder once`) once to create it",
            )
        if found != pg_schema.VERSION:
            raise StateError(
                f"has schema version {found}, this forwarder reads version {pg_schema.VERSION}",
                server=f"state store {self.label}",
                advice="run the same forwarder version as the service",
            )

    # Deliveries -------------------------------------------------------------------

    def claim(
        self,
        mailbox: str,
        requests: Sequence[ClaimRequest],
        owner: str,
        now: float,
        lease: float,
    ) -> list[Claim]:
        return pg_claims.claim(self._pool, mailbox, requests, owner, now, lease)

    def renew(self, owner: str, now: float, lease: float) -> None:
        self._pool.run(
            "renewing claims",
            lambda conn: conn.execute(
                f"UPDATE forwarder.deliveries SET claim_until = {pg_sql.LEASE} "
                "WHERE status = 'pending' AND claim_owner = %(owner)s",
                {"owner": owner, "lease": lease},
            ),
        )

    def release(self, mailbox: str, keys: Sequence[tuple[str, str]], owner: str) -> None:
        """Give back claims never used: the deliveries are due again at once."""
        if not keys:
            return
        ordered = sorted({(text(k), text(m)) for k, m in keys})
        self._pool.run(
            "releasing claims",
            lambda conn: conn.execute(
                "UPDATE forwarder.deliveries d SET status = 'deferred', next_try = NULL, "
                f"claim_owner = NULL, claim_until = NULL FROM {pg_sql.PAIRS} "
                "WHERE d.mailbox = %(mailbox)s AND d.message_key = r.k AND d.member = r.m "
                "AND d.status = 'pending' AND d.claim_owner = %(owner)s",
                {
                    "mailbox": mailbox,
                    "owner": owner,
                    "keys": [k for k, _ in ordered],
                    "members": [m for _, m in ordered],
                },
            ),
        )

    def record_results(self, mailbox: str, results: Sequence[MessageResult], now: float) -> None:
        """The servers' replies, in one transaction (a group commit). Idempotent: only a
        delivery still pending takes a result (the first one given for it here)."""
        rows: dict[tuple[str, str], tuple[str, int | None, str, float | None]] = {}
        for r in results:
            for d in r.deliveries:
                rows.setdefault(
                    (text(r.message_key), text(d.member)),
                    (d.status.value, d.code, text(d.reply[:1000]), d.next_try),
                )
        if not rows:
            return
        ordered = sorted(rows)
        params = {
            "mailbox": mailbox,
            "now": now,
            "keys": [k for k, _ in ordered],
            "members": [m for _, m in ordered],
            "statuses": [rows[p][0] for p in ordered],
            "codes": [rows[p][1] for p in ordered],
            "replies": [rows[p][2] for p in ordered],
            "next_tries": [rows[p][3] for p in ordered],
        }
        self._pool.run("recording results", lambda conn: conn.execute(pg_sql.RESULTS, params))

    # Folder progress --------------------------------------------------------------

    def folder(self, mailbox: str, uidvalidity: int) -> FolderState | None:
        return self._pool.run(
            "reading folder progress", lambda c: pg_folders.folder(c, mailbox, uidvalidity)
        )

    def last_folder(self, mailbox: str) -> FolderState | None:
        return self._pool.run(
            "reading folder progress", lambda c: pg_folders.last_folder(c, mailbox)
        )

    def open_uids(self, mailbox: str, uidvalidity: int, now: float) -> list[int]:
        return self._pool.run(
            "reading open messages", lambda c: pg_folders.open_uids(c, mailbox, uidvalidity, now)
        )

    def unmarked_uids(self, mailbox: str, uidvalidity: int) -> list[UidRecord]:
        """Final messages whose keywords were never confirmed set."""
        return self._pool.run(
            "reading unmarked messages",
            lambda c: pg_folders.unmarked_uids(c, mailbox, uidvalidity),
        )

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
        self._pool.run(
            "recording messages",
            lambda c: pg_folders.record_uids(
                c, mailbox, uidvalidity, records, now, watermark, complete_through, marked
            ),
        )

    # Mailbox leases -----------------------------------------------------------------

    def acquire_mailboxes(
        self, owner: str, names: Sequence[str], now: float, ttl: float
    ) -> set[str]:
        return self._pool.run(
            "taking mailbox leases",
            lambda conn: pg_leases.acquire(conn, owner, sorted(set(names)), now, ttl),
        )

    def release_mailboxes(self, owner: str) -> None:
        self._pool.run("giving mailbox leases back", lambda c: pg_leases.release(c, owner))

    # Reporting ----------------------------------------------------------------------

    def record_cycle(self, mailbox: str, cycle: CycleRecord) -> None:
        def body(conn: Connection) -> None:
            conn.execute(
                "INSERT INTO forwarder.cycles (mailbox, started, finished, outcome, messages, "
                "forwarded, delivered, deferred, failed, skipped, quarantined, error) "
                "VALUES (%(mailbox)s, %(started)s, %(finished)s, %(outcome)s, %(messages)s, "
                "%(forwarded)s, %(delivered)s, %(deferred)s, %(failed)s, %(skipped)s, "
                "%(quarantined)s, %(error)s)",
                {
                    **asdict(cycle),
                    "mailbox": mailbox,
                    "outcome": text(cycle.outcome),
                    "error": text(cycle.error),
                },
            )
            conn.execute(
                "DELETE FROM forwarder.cycles WHERE mailbox = %(m)s AND id <= "
                "(SELECT max(id) - %(kept)s FROM forwarder.cycles WHERE mailbox = %(m)s)",
                {"m": mailbox, "kept": CYCLES_KEPT},
            )

        self._pool.run("recording the cycle", body)

    def prune(self, before: float) -> int:
        """Forget deliveries and message records last touched before `before` (open ones and
        live claims excepted). The folder watermark keeps old messages from being re-read."""

        def body(conn: Connection) -> int:
            row = conn.execute(  # counted in SQL: a pipelined statement has no rowcount
                "WITH gone AS (DELETE FROM forwarder.deliveries WHERE updated < %s "
                "AND status <> 'pending' RETURNING 1) SELECT count(*) FROM gone",
                (before,),
            ).fetchone()
            conn.execute(
                "DELETE FROM forwarder.uids WHERE updated < %s AND state NOT IN (%s, %s)",
                (before, UidState.OPEN.value, UidState.QUARANTINED.value),
            )
            return int(row[0]) if row else 0

        return self._pool.run("pruning old records", body)

    def report(self, mailbox: str | None, failed_limit: int) -> StoreReport:
        return self._pool.run(
            "reading the status", lambda conn: read_report(conn, mailbox, failed_limit)
        )

    def deferred_counts(self) -> dict[str, int]:
        """Deliveries waiting for a retry now, per mailbox (for the daemon's metrics)."""
        rows = self._pool.run(
            "counting deferred deliveries",
            lambda c: c.execute(
                "SELECT mailbox, count(*) FROM forwarder.deliveries "
                "WHERE status = 'deferred' GROUP BY mailbox"
            ).fetchall(),
        )
        return {mailbox: count for mailbox, count in rows}

    # Operator commands (forwarder.pg_ops) -----------------------------------------------

    def deliveries(
        self, mailbox: str | None, query: DeliveryQuery, limit: int | None = None
    ) -> list[DeliveryRow]:
        return self._pool.run(
            "reading deliveries", lambda c: pg_ops.deliveries(c, mailbox, query, limit)
        )

    def uid_records(
        self,
        mailbox: str,
        uidvalidity: int,
        *,
        uids: Sequence[int] = (),
        message_keys: Sequence[str] = (),
        message_id: str | None = None,
    ) -> list[UidRecord]:
        return self._pool.run(
            "reading message records",
            lambda c: pg_ops.uid_records(c, mailbox, uidvalidity, uids, message_keys, message_id),
        )

    def requeue(
        self,
        mailbox: str,
        uidvalidity: int,
        deliveries: Sequence[tuple[str, str]],
        uids: Sequence[int],
        now: float,
    ) -> Requeued:
        return self._pool.run(
            "putting deliveries back in play",
            lambda c: pg_ops.requeue(c, mailbox, uidvalidity, deliveries, uids, now),
        )

    def close(self) -> None:
        self._pool.close()
