"""Folder progress in the SQLite store: the watermark and the record of every message
examined, per (mailbox, UIDVALIDITY, UID). Each function runs on the caller's
connection, inside its transaction when it writes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from forwarder.state import FolderState, UidRecord, UidState


def folder(db: sqlite3.Connection, mailbox: str, uidvalidity: int) -> FolderState | None:
    row = db.execute(
        "SELECT uidvalidity, watermark, complete_through FROM folders "
        "WHERE mailbox = ? AND uidvalidity = ?",
        (mailbox, uidvalidity),
    ).fetchone()
    return FolderState(*row) if row else None


def last_folder(db: sqlite3.Connection, mailbox: str) -> FolderState | None:
    row = db.execute(
        "SELECT uidvalidity, watermark, complete_through FROM folders "
        "WHERE mailbox = ? ORDER BY updated DESC LIMIT 1",
        (mailbox,),
    ).fetchone()
    return FolderState(*row) if row else None


def open_uids(db: sqlite3.Connection, mailbox: str, uidvalidity: int, now: float) -> list[int]:
    # INDEXED BY here and in unmarked_uids: without statistics SQLite prefers the
    # primary key, which has the same two leading columns, to a partial index, and
    # would read every record of the folder at every cycle.
    rows = db.execute(
        "SELECT uid FROM uids INDEXED BY uids_open WHERE mailbox = ? AND uidvalidity = ? "
        "AND state = 'open' AND (due IS NULL OR due <= ?) ORDER BY uid",
        (mailbox, uidvalidity, now),
    ).fetchall()
    return [uid for (uid,) in rows]


def unmarked_uids(db: sqlite3.Connection, mailbox: str, uidvalidity: int) -> list[UidRecord]:
    """Final messages whose keywords were never confirmed set."""
    rows = db.execute(
        "SELECT uid, state FROM uids INDEXED BY uids_unmarked WHERE mailbox = ? "
        "AND uidvalidity = ? AND marked = 0 AND state IN ('done', 'failed', 'quarantined') "
        "ORDER BY uid",
        (mailbox, uidvalidity),
    ).fetchall()
    return [UidRecord(uid, UidState(state)) for uid, state in rows]


def record_uids(
    db: sqlite3.Connection,
    mailbox: str,
    uidvalidity: int,
    records: Sequence[UidRecord],
    now: float,
    watermark: int | None,
    complete_through: float | None,
    marked: Sequence[int],
) -> None:
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
