"""The SQLite state file's schema, versioned, and its upgrades.

Version 1 (the first release) kept deliveries without a mailbox and skipped
messages by UID; version 2 keys everything by mailbox, adds claims, the sender,
per-UID records and folder watermarks. An upgrade runs inside the opening
transaction: it either completes or leaves the file as it was.
"""

from __future__ import annotations

import sqlite3

VERSION = 2

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deliveries (
    mailbox TEXT NOT NULL,
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
    sender TEXT,
    claim_owner TEXT,
    claim_until REAL,
    PRIMARY KEY (mailbox, message_key, member)
) WITHOUT ROWID;
-- Only rows still in play are indexed by state: a delivered row never enters this
-- index, so a store of millions of old deliveries costs nothing per new message.
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (next_try)
    WHERE status IN ('pending', 'deferred');
-- The claims in flight (none between cycles): renewed during long sends, and expired at
-- start-up by the one process of a SQLite store without a look at the deferred rows.
CREATE INDEX IF NOT EXISTS deliveries_claimed ON deliveries (claim_owner)
    WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_updated ON deliveries (updated);
CREATE INDEX IF NOT EXISTS deliveries_message_id ON deliveries (message_id);
CREATE INDEX IF NOT EXISTS deliveries_member ON deliveries (member);
CREATE TABLE IF NOT EXISTS folders (
    mailbox TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    watermark INTEGER NOT NULL,
    complete_through REAL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (mailbox, uidvalidity)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS uids (
    mailbox TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    state TEXT NOT NULL,
    message_key TEXT,
    message_id TEXT,
    reason TEXT,
    due REAL,
    updated REAL NOT NULL,
    marked INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (mailbox, uidvalidity, uid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS uids_open ON uids (mailbox, uidvalidity, due) WHERE state = 'open';
-- Final messages whose keywords are not set yet (a crash between record and STORE).
CREATE INDEX IF NOT EXISTS uids_unmarked ON uids (mailbox, uidvalidity)
    WHERE marked = 0 AND state IN ('done', 'failed', 'quarantined');
CREATE INDEX IF NOT EXISTS uids_updated ON uids (updated);
CREATE TABLE IF NOT EXISTS cycles (
    id INTEGER PRIMARY KEY,
    mailbox TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL NOT NULL,
    outcome TEXT NOT NULL,
    messages INTEGER NOT NULL,
    forwarded INTEGER NOT NULL,
    delivered INTEGER NOT NULL,
    deferred INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    skipped INTEGER NOT NULL,
    quarantined INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX IF NOT EXISTS cycles_mailbox ON cycles (mailbox, id);
"""


def version(db: sqlite3.Connection) -> int:
    """The schema version of an opened file (0: empty)."""
    has_meta = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if not has_meta:
        return 0
    row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    return int(row[0]) if row else 0


def migrate(db: sqlite3.Connection, default_mailbox: str) -> None:
    """Bring the file to VERSION, inside the caller's transaction."""
    current = version(db)
    if current > VERSION:
        raise sqlite3.DatabaseError(
            f"schema version {current} is newer than this forwarder's ({VERSION}); "
            "upgrade the forwarder"
        )
    if current == 1:
        _from_v1(db, default_mailbox)
    for statement in _TABLES.split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute(
        "INSERT INTO meta (key, value) VALUES ('schema', ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (str(VERSION),),
    )


def _from_v1(db: sqlite3.Connection, mailbox: str) -> None:
    """v1 -> v2: deliveries and cycles get the mailbox; skipped UIDs are dropped (the
    first cycle re-reads the folder from its keywords and records every UID)."""
    db.execute("ALTER TABLE deliveries RENAME TO deliveries_v1")
    db.execute("ALTER TABLE cycles RENAME TO cycles_v1")
    db.execute("DROP INDEX IF EXISTS deliveries_due")
    db.execute("DROP INDEX IF EXISTS deliveries_updated")
    for statement in _TABLES.split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute(
        "INSERT INTO deliveries (mailbox, message_key, member, address, status, code, reply, "
        "attempts, first_try, next_try, updated, lists, message_id) "
        "SELECT ?, message_key, member, address, status, code, reply, attempts, first_try, "
        "next_try, updated, lists, message_id FROM deliveries_v1",
        (mailbox,),
    )
    db.execute(
        "INSERT INTO cycles (id, mailbox, started, finished, outcome, messages, forwarded, "
        "delivered, deferred, failed, skipped, error) SELECT id, ?, started, finished, outcome, "
        "messages, forwarded, delivered, deferred, failed, skipped, error FROM cycles_v1",
        (mailbox,),
    )
    db.execute("DROP TABLE deliveries_v1")
    db.execute("DROP TABLE cycles_v1")
    db.execute("DROP TABLE IF EXISTS skipped")
