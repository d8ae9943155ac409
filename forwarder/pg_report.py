"""The read side of the PostgreSQL store: `forwarder status`'s numbers in one snapshot."""

from __future__ import annotations

from typing import Any

from forwarder.pg_connect import Connection
from forwarder.pg_ops import ORDER_RECENT
from forwarder.sqlite_report import ROW_COLUMNS, delivery_row
from forwarder.state import CycleRecord, StoreReport

_IN_PLAY = "count(*) FILTER (WHERE status IN ('pending', 'deferred'))"


def read_report(conn: Connection, mailbox: str | None, failed_limit: int) -> StoreReport:
    """Inside the caller's transaction, made a read-only snapshot here."""
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    where, also = ("WHERE mailbox = %(m)s", "AND mailbox = %(m)s") if mailbox else ("", "")
    args: dict[str, Any] = {"m": mailbox, "limit": failed_limit}

    def rows(query: str) -> list[tuple[Any, ...]]:
        return conn.execute(query, args).fetchall()

    last = rows(
        "SELECT started, finished, outcome, messages, forwarded, delivered, deferred, "
        f"failed, skipped, error, quarantined FROM forwarder.cycles {where} "
        "ORDER BY id DESC LIMIT 1"
    )
    [(cycles,)] = rows(f"SELECT count(*) FROM forwarder.cycles {where}")
    deliveries = dict(
        rows(f"SELECT status, count(*) FROM forwarder.deliveries {where} GROUP BY status")
    )
    # A message counts for a list once none of its deliveries is still in play.
    forwarded: dict[str, int] = {}
    for lists, count in rows(
        "SELECT lists, count(*) FROM (SELECT min(lists) AS lists "
        f"FROM forwarder.deliveries {where} GROUP BY mailbox, message_key "
        f"HAVING {_IN_PLAY} = 0 AND count(*) FILTER (WHERE status = 'delivered') > 0) AS m "
        "GROUP BY lists"
    ):
        for address in (p for p in lists.split(",") if p):
            forwarded[address] = forwarded.get(address, 0) + count
    uids = dict(rows(f"SELECT state, count(*) FROM forwarder.uids {where} GROUP BY state"))
    skipped = dict(
        rows(
            "SELECT reason, count(*) FROM forwarder.uids WHERE state = 'skipped' "
            f"{also} GROUP BY reason ORDER BY reason"
        )
    )
    deferred = rows(
        f"SELECT {ROW_COLUMNS} FROM forwarder.deliveries WHERE status = 'deferred' {also} "
        'ORDER BY next_try, message_key COLLATE "C", member COLLATE "C"'
    )
    failed = rows(
        f"SELECT {ROW_COLUMNS} FROM forwarder.deliveries WHERE status = 'failed' {also} "
        f"ORDER BY {ORDER_RECENT} LIMIT %(limit)s"
    )
    return StoreReport(
        last_cycle=CycleRecord(*last[0]) if last else None,
        cycles=cycles,
        deliveries=deliveries,
        forwarded_per_list=dict(sorted(forwarded.items())),
        uids=uids,
        skipped=skipped,
        deferred=[delivery_row(r) for r in deferred],
        failed=[delivery_row(r) for r in failed],
        failed_total=deliveries.get("failed", 0),
    )
