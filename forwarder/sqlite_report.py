"""The read side of the SQLite store: `forwarder status`'s numbers in one snapshot."""

from __future__ import annotations

import sqlite3
from typing import Any

from forwarder.state import CycleRecord, DeliveryRow, Status, StoreReport

ROW_COLUMNS = (
    "mailbox, message_key, message_id, sender, member, address, status, code, reply, "
    "attempts, first_try, next_try, updated, lists"
)


def delivery_row(values: tuple[Any, ...]) -> DeliveryRow:
    (
        mailbox,
        key,
        message_id,
        sender,
        member,
        address,
        status,
        code,
        reply,
        attempts,
        first_try,
        next_try,
        updated,
        lists,
    ) = values
    return DeliveryRow(
        mailbox,
        key,
        message_id,
        sender,
        member,
        address,
        Status(status),
        code,
        reply,
        attempts,
        first_try,
        next_try,
        updated,
        tuple(p for p in (lists or "").split(",") if p),
    )


def read_report(db: sqlite3.Connection, mailbox: str | None, failed_limit: int) -> StoreReport:
    where, args = ("WHERE mailbox = ?", [mailbox]) if mailbox else ("", [])
    also = "AND mailbox = ?" if mailbox else ""
    db.execute("BEGIN")  # one consistent snapshot, even while the daemon writes
    try:
        row = db.execute(
            "SELECT started, finished, outcome, messages, forwarded, delivered, deferred, "
            f"failed, skipped, error, quarantined FROM cycles {where} ORDER BY id DESC LIMIT 1",
            args,
        ).fetchone()
        last = CycleRecord(*row) if row else None
        (cycles,) = db.execute(f"SELECT COUNT(*) FROM cycles {where}", args).fetchone()
        deliveries = dict(
            db.execute(
                f"SELECT status, COUNT(*) FROM deliveries {where} GROUP BY status ORDER BY status",
                args,
            ).fetchall()
        )
        # A message counts for a list once none of its deliveries is still in play.
        forwarded: dict[str, int] = {}
        for lists, count in db.execute(
            f"SELECT lists, COUNT(*) FROM (SELECT mailbox, message_key, MIN(lists) AS lists "
            f"FROM deliveries {where} GROUP BY mailbox, message_key "
            "HAVING SUM(status IN ('pending', 'deferred')) = 0 "
            "AND SUM(status = 'delivered') > 0) GROUP BY lists",
            args,
        ):
            for address in (p for p in lists.split(",") if p):
                forwarded[address] = forwarded.get(address, 0) + count
        uids = dict(db.execute(f"SELECT state, COUNT(*) FROM uids {where} GROUP BY state", args))
        skipped = dict(
            db.execute(
                f"SELECT reason, COUNT(*) FROM uids WHERE state = 'skipped' {also} "
                "GROUP BY reason ORDER BY reason",
                args,
            )
        )
        deferred = [
            delivery_row(r)
            for r in db.execute(
                f"SELECT {ROW_COLUMNS} FROM deliveries WHERE status = 'deferred' {also} "
                "ORDER BY next_try, message_key, member",
                args,
            )
        ]
        failed = [
            delivery_row(r)
            for r in db.execute(
                f"SELECT {ROW_COLUMNS} FROM deliveries WHERE status = 'failed' {also} "
                "ORDER BY updated DESC, message_key, member LIMIT ?",
                [*args, failed_limit],
            )
        ]
    finally:
        db.execute("COMMIT")
    return StoreReport(
        last_cycle=last,
        cycles=cycles,
        deliveries=deliveries,
        forwarded_per_list=dict(sorted(forwarded.items())),
        uids=uids,
        skipped=skipped,
        deferred=deferred,
        failed=failed,
        failed_total=deliveries.get("failed", 0),
    )
