"""Folder progress in the PostgreSQL store: the watermark and the record of every message
examined, per (mailbox, UIDVALIDITY, UID). Each function runs on the caller's
connection, inside its transaction (`Pool.run`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from forwarder import pg_sql
from forwarder.pg_connect import Connection, text
from forwarder.state import FolderState, UidRecord, UidState

_FOLDER = "SELECT uidvalidity, watermark, complete_through FROM forwarder.folders "


def folder(conn: Connection, mailbox: str, uidvalidity: int) -> FolderState | None:
    row = conn.execute(
        _FOLDER + "WHERE mailbox = %s AND uidvalidity = %s", (mailbox, uidvalidity)
    ).fetchone()
    return FolderState(*row) if row else None


def last_folder(conn: Connection, mailbox: str) -> FolderState | None:
    row = conn.execute(
        _FOLDER + "WHERE mailbox = %s ORDER BY updated DESC LIMIT 1", (mailbox,)
    ).fetchone()
    return FolderState(*row) if row else None


def open_uids(conn: Connection, mailbox: str, uidvalidity: int, now: float) -> list[int]:
    rows = conn.execute(
        "SELECT uid FROM forwarder.uids WHERE mailbox = %s AND uidvalidity = %s "
        "AND state = 'open' AND (due IS NULL OR due <= %s) ORDER BY uid",
        (mailbox, uidvalidity, now),
    ).fetchall()
    return [uid for (uid,) in rows]


def unmarked_uids(conn: Connection, mailbox: str, uidvalidity: int) -> list[UidRecord]:
    rows = conn.execute(
        "SELECT uid, state FROM forwarder.uids WHERE mailbox = %s AND uidvalidity = %s "
        "AND NOT marked AND state IN ('done', 'failed', 'quarantined') ORDER BY uid",
        (mailbox, uidvalidity),
    ).fetchall()
    return [UidRecord(uid, UidState(state)) for uid, state in rows]


def record_uids(
    conn: Connection,
    mailbox: str,
    uidvalidity: int,
    records: Sequence[UidRecord],
    now: float,
    watermark: int | None,
    complete_through: float | None,
    marked: Sequence[int],
) -> None:
    latest = {r.uid: r for r in records}  # a later record of one UID replaces an earlier
    rs = [latest[uid] for uid in sorted(latest)]
    args: dict[str, Any] = {
        "mailbox": mailbox,
        "uidvalidity": uidvalidity,
        "now": now,
        "watermark": watermark,
        "complete_through": complete_through,
        "marked": sorted(set(marked)),
        "uids": [r.uid for r in rs],
        "states": [r.state.value for r in rs],
        "keys": [text(r.message_key) for r in rs],
        "ids": [text(r.message_id) for r in rs],
        "reasons": [text(r.reason) for r in rs],
        "dues": [r.due for r in rs],
    }
    conn.execute(
        "INSERT INTO forwarder.folders (mailbox, uidvalidity, watermark, "
        "complete_through, created, updated) VALUES (%(mailbox)s, %(uidvalidity)s, "
        "coalesce(%(watermark)s, 0), %(complete_through)s, %(now)s, %(now)s) "
        "ON CONFLICT (mailbox, uidvalidity) DO UPDATE SET updated = excluded.updated, "
        "watermark = greatest(folders.watermark, excluded.watermark), "
        "complete_through = coalesce(excluded.complete_through, "
        "folders.complete_through)",
        args,
    )
    if rs:
        conn.execute(pg_sql.UIDS, args)
    if marked:
        conn.execute(
            "UPDATE forwarder.uids SET marked = true WHERE mailbox = %(mailbox)s "
            "AND uidvalidity = %(uidvalidity)s AND uid = ANY(%(marked)s::bigint[])",
            args,
        )
